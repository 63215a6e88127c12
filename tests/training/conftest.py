"""Fixtures for the training tests: a tiny BPE tokenizer trained here, and tiny Llama models with an adapter."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit import register_method
from lorakit.core import registry
from lorakit.data import Example, load_examples, pretraining_texts
from lorakit.methods.lora import build_lora

from lk_models import tiny_bpe_tokenizer



@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_bpe_tokenizer(pretraining_texts(n_per_task=20), vocab_size=300)


@pytest.fixture(scope="session")
def reverse_train() -> list[Example]:
    return load_examples("reverse", "train", n=48, seed=0)


@pytest.fixture(scope="session")
def reverse_test() -> list[Example]:
    return load_examples("reverse", "test", n=4, seed=0)


ModelFactory = Callable[..., LlamaForCausalLM]
# lm_head is adapted too: a random base's head is too flat for LoRA on the inner layers alone to move the loss.
TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="session")
def make_model(tokenizer: PreTrainedTokenizerFast) -> ModelFactory:
    """``make_model(config=None, seed=0, **lora_kwargs)``: a fresh ~50k-parameter Llama with adapter "default"
    (``config``, else LoRA r=4 on TARGETS with ``lora_kwargs``). Same seed, same weights, adapter included."""

    def build(config: lorakit.AdapterConfig | None = None, seed: int = 0, **lora_kwargs) -> LlamaForCausalLM:
        model_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config)
        config = config or lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora_kwargs)
        return lorakit.add_adapter(model, config)

    return build


@pytest.fixture(scope="session")
def trainer_with_checkpoints(tokenizer: PreTrainedTokenizerFast, reverse_train: list[Example]):
    """``run(model, output_dir, max_steps, save_steps, resume=None)``: transformers.Trainer with LorakitCallback on
    the reverse task (batch 4, lr 1e-2, seed 0, CPU), a checkpoint every ``save_steps``, resumed from the checkpoint
    folder ``resume`` when given; returns ``model`` after ``train``."""
    from transformers import Trainer, TrainingArguments

    from lorakit.data import CausalLMCollator, TokenizedDataset
    from lorakit.training import LorakitCallback

    def run(model, output_dir, max_steps: int, save_steps: int, resume: str | None = None):
        args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=save_steps,
                                 use_cpu=True, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer),
                callbacks=[LorakitCallback("default")]).train(resume_from_checkpoint=resume)
        return model

    return run


@dataclass
class HookedLoraConfig(lorakit.LoraConfig):
    """Plain LoRA under another name, registered with every optional hook (test-only)."""


@pytest.fixture
def hooked_method() -> Iterator[SimpleNamespace]:
    """Registers "test_hooks" (LoRA + recording hooks) for one test; yields ``.config`` (its config class)
    and ``.calls`` (what each hook saw).

    - ``init`` sets every lora_B to 0.01 (so that lora_A gets gradients from step 1);
    - ``param_groups`` gives lora_B a learning rate of 0 (so it must stay at 0.01);
    - ``extra_loss`` is 10·Σ‖lora_A‖² (so lora_A shrinks).
    """
    calls: dict[str, list] = {"init": [], "on_step": [], "param_groups": [], "extra_loss": []}

    def named(model, part: str) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if part in n]

    def init(model, name, batches):
        calls["init"].append(batches)
        with torch.no_grad():
            for p in named(model, "lora_B"):
                p.fill_(0.01)

    def on_step(model, name, step, total_steps):
        calls["on_step"].append((step, total_steps))

    def param_groups(model, name, lr):
        calls["param_groups"].append(lr)
        return [{"params": named(model, "lora_A")}, {"params": named(model, "lora_B"), "lr": 0.0}]

    def extra_loss(model, name):
        calls["extra_loss"].append(name)
        return 10 * sum((p ** 2).sum() for p in named(model, "lora_A"))

    register_method("test_hooks", config=HookedLoraConfig, build=build_lora, description="LoRA with test hooks",
                    layer_kinds=("linear",), init=init, on_step=on_step, param_groups=param_groups,
                    extra_loss=extra_loss)
    try:
        yield SimpleNamespace(config=HookedLoraConfig, calls=calls)
    finally:  # keep the method out of the registry-driven test matrices
        registry._METHODS.pop("test_hooks", None)
