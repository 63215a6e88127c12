"""FFA-LoRA: A frozen at its random init, only B trains; the adapter is a plain PEFT LoRA."""

from __future__ import annotations

import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.ffa_lora import FfaLoraConfig
from lorakit.training.config import TrainConfig
from lorakit.training.loop import make_optimizer

from lk_models import assert_exports_to_peft, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_ffa_lora_trains_only_B(ids):
    # Paper (arXiv:2403.12313, §4 "FFA-LoRA"): A fixed at its random initialisation, B initialised to 0 and trained.
    model = lk.add_adapter(tiny_llama(), FfaLoraConfig(r=4, target_modules=TARGETS))
    deltas = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    A0 = [d.lora_A.weight.detach().clone() for d in deltas]
    assert all(a.abs().sum() > 0 for a in A0) and all(torch.all(d.lora_B.weight == 0) for d in deltas)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B.weight") for n in trainable)
    optimizer, params = make_optimizer(model, "default", TrainConfig(lr=1e-2))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(d.lora_A.weight, a) for d, a in zip(deltas, A0))
    assert all(d.lora_B.weight.abs().sum() > 0 for d in deltas)
    assert lk.trainable_parameters(model)[0] == sum(d.lora_B.weight.numel() for d in deltas)


def test_ffa_lora_exports_to_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), FfaLoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_B.weight.normal_(std=0.3)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"


def test_ffa_lora_refuses_dora():
    import pytest

    with pytest.raises(lk.ConfigError, match="use_dora"):
        FfaLoraConfig(use_dora=True)


def test_ffa_lora_export_keeps_modules_to_save(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), FfaLoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["modules_to_save"] == ["lm_head"]
