"""LaMDA: s·B S A with A frozen, the r×r S trained and B frozen column by column (official ArminAzizi98/LaMDA
``lamda.py`` forward, ``custom_trainer.py`` ``gradual_freeze_B``; the paper's SVD projections and early full freeze)."""

from __future__ import annotations


import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers, refresh_trainable
from lorakit.methods.lamda import LamdaConfig, columns_frozen, lamda_on_step

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _deltas(model, name="default"):
    return [layer.adapters[name] for _, layer in adapter_layers(model)]


def test_lamda_code_init_follows_official_forward(ids):
    model = lk.add_adapter(tiny_llama(), LamdaConfig(r=4, lora_alpha=16, init_weights="lora", target_modules=TARGETS))
    for d in _deltas(model):
        assert torch.count_nonzero(d.lora_B.weight) == 0  # PEFT LoRA init: B = 0 ⇒ ΔW = 0
        with torch.no_grad():
            d.lora_B.weight.normal_()
        x = torch.randn(5, d.info.in_features)
        # lamda.py line 27: result += lora_B(sigma(lora_A(dropout(x)))) * scaling, scaling = lora_alpha / r
        want = d.lora_B(d.sigma(d.lora_A(x))) * (16 / 4)
        torch.testing.assert_close(d(x, torch.zeros(5, d.info.out_features), None), want, atol=1e-5, rtol=1e-5)


def test_lamda_svd_projections_and_zero_start(ids):
    base = tiny_llama()
    ref = base(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), LamdaConfig(r=4, target_modules=TARGETS))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)  # S = 0
    weights = dict(base.named_modules())
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        U, S, Vh = torch.linalg.svd(weights[path].weight.float(), full_matrices=False)
        signs = torch.sign((d.lora_B.weight * U[:, :4]).sum(0))  # singular vectors are defined up to sign
        torch.testing.assert_close(d.lora_B.weight, U[:, :4] * signs, atol=1e-5, rtol=0)
        torch.testing.assert_close(d.lora_A.weight, Vh[:4] * signs[:, None], atol=1e-5, rtol=0)
        with torch.no_grad():
            d.sigma.weight.normal_()
        # paper: Y = XW + α·X A S B, i.e. ΔW = s · B S A in the (out, in) layout
        torch.testing.assert_close(d.delta_weight(), d.lora_B.weight @ d.sigma.weight @ d.lora_A.weight * 4,
                                   atol=1e-5, rtol=1e-5)


def test_lamda_freezes_A_always_and_B_column_by_column(ids):
    model = lk.add_adapter(tiny_llama(), LamdaConfig(r=4, freeze_ratio=0.5, target_modules=TARGETS))
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sigma", "lora_B"}
    # the paper's schedule: all r columns frozen at freeze_ratio · total steps, evenly before it
    assert [columns_frozen(s, 20, 4, 0.5) for s in (0, 2, 3, 5, 7, 9, 10, 20)] == [0, 0, 1, 2, 2, 3, 4, 4]
    lamda_on_step(model, "default", 5, 20)  # t = 2
    with torch.no_grad():
        for d in _deltas(model):
            d.sigma.weight.normal_()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for d in _deltas(model):
        # gradual_freeze_B: p.grad[:, :t] = 0 for the first t columns, the rest still learns
        assert torch.count_nonzero(d.lora_B.weight.grad[:, :2]) == 0
        assert torch.count_nonzero(d.lora_B.weight.grad[:, 2:]) > 0
        assert d.lora_A.weight.grad is None
    lamda_on_step(model, "default", 10, 20)
    refresh_trainable(model)  # the training loop does this after every on_step
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sigma"}  # only the LDA trains: r² per layer
    assert lk.trainable_parameters(model)[0] == 16 * 6


def test_lamda_frozen_columns_survive_save_and_load(tmp_path, ids):
    model = lk.add_adapter(tiny_llama(), LamdaConfig(r=4, target_modules=TARGETS))
    lamda_on_step(model, "default", 3, 10)
    lk.save_adapter(model, tmp_path / "a")
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "a", is_trainable=True)
    assert [int(d.frozen_columns) for d in _deltas(fresh)] == [columns_frozen(3, 10, 4, 0.3)] * 6


def test_lamda_config_errors():
    with pytest.raises(lk.ConfigError, match="freeze_ratio"):
        LamdaConfig(freeze_ratio=0.0)
    with pytest.raises(lk.ConfigError, match="init_weights"):
        LamdaConfig(init_weights="pissa")
