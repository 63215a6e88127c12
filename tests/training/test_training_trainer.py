"""A lorakit model trains under transformers.Trainer; LorakitCallback adds the method hooks and adapter files."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lorakit
from lorakit.data import CausalLMCollator, TokenizedDataset
from lorakit.training import LorakitCallback, TrainConfig, make_optimizer


def run_trainer(model, tokenizer, examples, output_dir, optimizer=None) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(examples, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer), callbacks=[LorakitCallback("default")],
                      optimizers=(optimizer, None))
    trainer.train()
    return trainer


def test_trains_under_hf_trainer(make_model, tokenizer, reverse_train, tmp_path) -> None:
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = run_trainer(model, tokenizer, reverse_train, tmp_path)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # the adapter learned; the base is untouched
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # The callback saved the adapter in PEFT format; it loads into a fresh base.
    fresh = lorakit.unload(make_model())
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(lorakit.adapter_state_dict(fresh), lorakit.adapter_state_dict(model.cpu()))


def test_callback_runs_method_hooks(hooked_method, make_model, tokenizer, reverse_train, tmp_path) -> None:
    model = make_model(hooked_method.config(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer, _ = make_optimizer(model, "default", TrainConfig(lr=1e-2))  # the method's param_groups
    with pytest.warns(UserWarning, match="extra_loss"):
        run_trainer(model, tokenizer, reverse_train, tmp_path, optimizer)
    calls = hooked_method.calls
    assert len(calls["init"]) == 1 and len(calls["init"][0]) == 4
    assert calls["on_step"] == [(1, 3), (2, 3), (3, 3)]
    for n, p in model.named_parameters():
        if "lora_B" in n:  # set by init, kept there by its param group's lr of 0 under Trainer's schedule
            assert torch.all(p == 0.01), n
