"""S2-LoRA: A and B shared by every layer of one shape, per-module rank coefficients λ with an L1 penalty
(paper: arXiv:2309.11756 abstract; no official code exists; init as PEFT's AdaLoRA, whose rank coefficient the
paper adopts)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.s2lora import S2LoraConfig, rank_distribution, s2lora_extra_loss

from lk_models import assert_exports_to_peft, tiny_llama, train_with_hooks

TARGETS = ["q_proj", "o_proj", "v_proj", "down_proj"]


def _deltas(model):
    return {path: layer.adapters["default"] for path, layer in adapter_layers(model)}


def test_s2lora_shares_A_B_per_shape_and_keeps_lambda_per_module():
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, target_modules=TARGETS))
    d = _deltas(model)
    square = [d[p] for p in d if p.endswith(("q_proj", "o_proj"))]  # 32→32 in both layers: one shape group
    assert all(x.shared is square[0].shared for x in square)
    assert d["model.layers.0.self_attn.v_proj"].shared is not square[0].shared  # 32→16
    assert len({id(x.lora_lambda) for x in d.values()}) == len(d)
    # trainable: r·(in+out) per shape group + r per module
    expected = 4 * ((32 + 32) + (32 + 16) + (64 + 32)) + 4 * len(d)
    assert lk.trainable_parameters(model)[0] == expected


def test_s2lora_delta_is_B_diag_lambda_A(ids):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ref = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)  # λ = 0 (AdaLoRA's E = 0)
    with torch.no_grad():
        for x in _deltas(model).values():
            x.lora_lambda.normal_()
    for x in _deltas(model).values():
        A, B, lam = x.shared["A"], x.shared["B"], x.lora_lambda
        inp = torch.randn(3, A.shape[1])
        want = inp @ (B @ torch.diag(lam) @ A).T * (8 / 4)  # ΔW_m = s · B diag(λ_m) A
        torch.testing.assert_close(x(inp, torch.zeros(3, B.shape[0]), None), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.delta_weight(), B @ torch.diag(lam) @ A * 2, atol=1e-5, rtol=1e-5)


def test_s2lora_l1_penalty_sparsifies_lambda(ids):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, l1_lambda=0.5, target_modules=TARGETS))
    lambdas = [x.lora_lambda for x in _deltas(model).values()]
    with torch.no_grad():
        for lam in lambdas:
            lam.fill_(0.3)
    penalty = s2lora_extra_loss(model, "default")
    torch.testing.assert_close(penalty, torch.tensor(0.5 * 0.3 * 4 * len(lambdas)))  # l1_lambda · Σ_m ‖λ_m‖₁
    free = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, l1_lambda=0.0, target_modules=TARGETS))
    for m in (model, free):
        with torch.no_grad():
            for x in _deltas(m).values():
                x.lora_lambda.fill_(0.3)
        train_with_hooks(m, ids, steps=15, lr=1e-2)
    mass = {id(m): sum(float(x.lora_lambda.detach().abs().sum()) for x in _deltas(m).values()) for m in (model, free)}
    assert mass[id(model)] < 0.5 * mass[id(free)]
    assert set(rank_distribution(model, "default")) == set(_deltas(model))


def test_s2lora_exports_to_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for x in _deltas(model).values():
            x.lora_lambda.normal_()
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4


def test_s2lora_config_errors():
    with pytest.raises(lk.ConfigError, match="l1_lambda"):
        S2LoraConfig(l1_lambda=-1.0)
