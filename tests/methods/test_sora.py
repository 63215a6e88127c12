"""SoRA: gated ranks, the official proximal rule and ξ schedule, own optimizer group, pruning to a PEFT LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.sora import SoraConfig, rank_distribution, sora_extra_loss, sora_on_step
from lorakit.training.config import TrainConfig
from lorakit.training.loop import make_optimizer

from lk_models import assert_exports_to_peft, tiny_llama, train_with_hooks

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _official_prox(p: np.ndarray, xi: float) -> np.ndarray:
    """TsinghuaC3I/SoRA src/sparse_optimizer.py SparseAdamW.step (lines ~104-107), on a copy, op by op."""
    p = p.copy()
    p[p > xi] -= xi
    p[p < -xi] += xi
    p[abs(p) < xi] = 0.0
    return p


def test_sora_proximal_step_matches_official_rule():
    model = lk.add_adapter(tiny_llama(), SoraConfig(r=8, sparse_lambda_2=0.1, target_modules=TARGETS))
    d = next(iter(adapter_layers(model)))[1].adapters["default"]
    values = torch.tensor([[0.05, -0.05, 0.15, -0.15, 0.25, -0.3, 0.0, 1.0]])
    with torch.no_grad():
        d.gate.copy_(values)
    sora_on_step(model, "default", 1, 10)
    expected = _official_prox(values.numpy(), 0.1)
    np.testing.assert_allclose(d.gate.detach().numpy(), expected, atol=1e-7)
    # the quirk: |g| in (ξ, 2ξ) is zeroed, not just shrunk
    assert d.gate[0, 2] == 0 and abs(float(d.gate[0, 4].detach()) - 0.15) < 1e-6


@pytest.mark.parametrize("schedule", ["linear", "log_linear", "exp_linear"])
def test_sora_threshold_schedule_matches_official_lambda_list(schedule):
    config = SoraConfig(sparse_lambda_2=1e-4, max_lambda=7e-4, lambda_num=7, lambda_schedule=schedule)
    lo, hi, n = 1e-4, 7e-4, 7
    # sparse_optimizer.py _build_lambda_list (lines ~24-38)
    official = {"linear": np.linspace(lo, hi, n), "log_linear": np.log(np.linspace(np.exp(lo), np.exp(hi), n)),
                "exp_linear": np.exp(np.linspace(np.log(lo), np.log(hi), n))}[schedule]
    total = 70
    got = [config.threshold(step, total) for step in range(1, total + 1)]
    np.testing.assert_allclose(got[::10], official, rtol=1e-9)  # stage k covers steps 10k+1..10k+10
    assert got[9] == got[0] and got[10] != got[9]


def test_sora_extra_loss_is_normalised_l1():
    model = lk.add_adapter(tiny_llama(), SoraConfig(r=4, sparse_lambda=10.0, target_modules=TARGETS))
    gates = [layer.adapters["default"].gate for _, layer in adapter_layers(model)]
    # trainer.py compute_loss: sparse_lambda * sum|gate| / total numel
    expected = 10.0 * sum(float(g.detach().abs().sum()) for g in gates) / sum(g.numel() for g in gates)
    assert abs(float(sora_extra_loss(model, "default").detach()) - expected) < 1e-5


def test_sora_gate_optimizer_group():
    model = lk.add_adapter(tiny_llama(), SoraConfig(r=4, sparse_lr=0.5, target_modules=TARGETS))
    optimizer, _ = make_optimizer(model, "default", TrainConfig(lr=1e-3, weight_decay=0.1))
    main, gates = optimizer.param_groups
    gate_ids = {id(layer.adapters["default"].gate) for _, layer in adapter_layers(model)}
    assert {id(p) for p in gates["params"]} == gate_ids and gates["lr"] == 0.5 and gates["weight_decay"] == 0.0
    assert main["lr"] == 1e-3 and not gate_ids & {id(p) for p in main["params"]}


def test_sora_training_zeroes_gates_and_prunes_to_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), SoraConfig(r=4, sparse_lambda_2=0.3, target_modules=TARGETS))
    train_with_hooks(model, ids, 3)
    ranks = rank_distribution(model, "default")
    assert sum(ranks.values()) < 4 * len(ranks)  # randn gates under ξ=0.3 (twice: < 0.6 zeroed) lose ranks
    with torch.no_grad():  # make the per-module ranks differ for sure, one module fully pruned
        patterns = [[0.0, 0.0, 0.0, 0.0], [0.7, 0.0, -1.2, 0.0], [0.7, 0.4, -1.2, 2.0]]
        for i, (_, layer) in enumerate(adapter_layers(model)):
            layer.adapters["default"].gate.copy_(torch.tensor([patterns[min(i, 1 + i % 2)]]))
            layer.adapters["default"].lora_B.weight.normal_(std=0.5)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    ranks = rank_distribution(model, "default")
    kept = sorted(p for p, k in ranks.items() if k)
    assert cfg["target_modules"] == kept and len(kept) == len(ranks) - 1
    assert set(cfg["rank_pattern"].values()) | {cfg["r"]} == {2, 4}
