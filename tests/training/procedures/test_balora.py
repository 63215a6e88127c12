"""BA-LoRA (``training/procedures/balora.py``) against the official NLG regularisers, cyp-jlu-ai/BA-LoRA ``train.py``
``CustomTrainer.compute_loss`` (task_type "nlg": ``kl_div(fine_probs.log(), pre_probs, reduction='batchmean')``,
``diversity_loss = -entropy`` with ``entropy = -sum(p·log(p + 1e-10)).mean()``) and ``svd_regularization``
(−mean of top-k singular-value share; per example here), with the official separate frozen copy of the base."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train

from lk_models import tiny_llama


def _official_nlg(fine_logits, pre_logits, k, l1, l2, l3):
    pre_probs = torch.softmax(pre_logits, dim=-1)
    fine_probs = torch.softmax(fine_logits, dim=-1)
    consistency = torch.nn.functional.kl_div(fine_probs.log(), pre_probs, reduction="batchmean")
    entropy = -torch.sum(fine_probs * torch.log(fine_probs + 1e-10), dim=-1).mean()
    s = torch.linalg.svdvals(fine_logits)  # per example (T, V)
    svd = -(s[:, :k].sum(dim=1) / (s.sum(dim=1) + 1e-10)).mean()
    return l1 * consistency + l2 * (-entropy) + l3 * svd


def test_balora_loss_matches_official_with_a_frozen_copy():
    base = tiny_llama()
    frozen_copy = copy.deepcopy(base).eval()
    model = lk.add_adapter(base, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    args = {"lambda1": 0.3, "lambda2": 0.2, "lambda3": 0.1, "k": 2}
    config = TrainConfig(procedure="balora", procedure_args=args)
    procedure = get_procedure("balora").build(config)
    make_optimizer(model, "default", config, procedure=procedure)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits
    got = procedure.extra_loss(model, "default")
    with torch.no_grad():
        pre = frozen_copy(input_ids=ids, attention_mask=mask).logits
    want = _official_nlg(logits, pre, 2, 0.3, 0.2, 0.1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got.backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight.grad.abs().sum() > 0
    assert procedure.extra_loss(model, "default") is None  # one regulariser per training forward
    procedure.finish(model, "default")


def test_balora_trains_in_the_loop_with_one_base_pass(make_model, tokenizer, reverse_train):
    model = make_model()
    forwards = []
    model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    result = train(model, tokenizer, reverse_train, TrainConfig(steps=2, batch_size=4, lr=1e-2, procedure="balora",
                                                                procedure_args={"lambda1": 0.1}), progress=False)
    assert len(result.losses) == 2 and len(forwards) == 2 * 2  # the training forward + the adapters-disabled one
    assert not model._forward_hooks


def test_balora_config_errors():
    with pytest.raises(lk.ConfigError, match="lambda2"):
        TrainConfig(procedure="balora", procedure_args={"lambda2": -1.0})


def test_balora_under_hf_trainer(tokenizer, reverse_train, tmp_path):
    """Under Trainer the callback adds the procedure's loss: one adapters-disabled pass per micro-batch, and
    training differs from plain LoRA."""
    from transformers import Trainer, TrainingArguments

    from lorakit.data import CausalLMCollator, TokenizedDataset
    from lorakit.training import LorakitCallback

    from lk_models import tiny_llama_for

    def run(procedure_args):
        model = lk.add_adapter(tiny_llama_for(tokenizer), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        forwards = []
        model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
        callbacks = [LorakitCallback("default")]
        optimizer = None
        if procedure_args is not None:
            config = TrainConfig(lr=1e-2, procedure="balora", procedure_args=procedure_args)
            procedure = get_procedure("balora").build(config)
            optimizer = make_optimizer(model, "default", config, procedure=procedure)[0]
            callbacks = [LorakitCallback("default", procedure=procedure)]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer), optimizers=(optimizer, None),
                callbacks=callbacks).train()
        return model, len(forwards)

    ours, n_ours = run({"lambda1": 1.0, "lambda2": 1.0, "lambda3": 1.0})
    plain, n_plain = run(None)
    assert n_ours == 2 * n_plain == 4
    a, b = lk.adapter_state_dict(ours), lk.adapter_state_dict(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)
