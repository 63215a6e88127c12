"""DyLoRA: nested ranks trained with b ~ U{1..r}, frozen lower ranks, evaluation/export at any rank b <= r."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.dylora import DyLoraConfig, dylora_on_step, set_rank
from lorakit.methods.lora import LoraConfig

from lk_models import assert_exports_to_peft, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 4, 8


def _dylora(seed=0, **kw):
    model = lk.add_adapter(tiny_llama(), DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_B.weight.copy_(torch.randn(layer.adapters["default"].lora_B.weight.shape, generator=g))
    return model


def _official_delta(x, A, B, alpha, r_max, b):
    """DyLoRA/loralib/DyLoRA.py ``dynamic.forward`` (lines 46-62, commit bb44348) with current_rank = b-1: each of A (as
    lora_A.T) and B is cut to its first b rank columns and scaled by sqrt(r_max / b); layers.py Linear.forward
    (lines 174-182) then computes ``dropout(x) @ lora_A.T @ lora_B.T * scaling``, scaling = lora_alpha / r_max."""
    a = (A.T[:, :b] * math.sqrt(r_max / b)).T
    bb = B[:, :b] * math.sqrt(r_max / b)
    return x @ a.T @ bb.T * (alpha / r_max)


@pytest.mark.parametrize("b", [1, 3, 4])
def test_dylora_train_forward_matches_official_at_sampled_rank(b):
    model = _dylora()
    path, layer = next(iter(adapter_layers(model)))
    d = layer.adapters["default"]
    d.train()
    d.train_rank.fill_(b)
    x = torch.randn(5, d.info.in_features)
    out = d(x, torch.zeros(5, d.info.out_features), layer.base_layer)
    torch.testing.assert_close(out, _official_delta(x, d.lora_A.weight, d.lora_B.weight, ALPHA, R, b))


def test_dylora_frozen_mode_trains_only_the_bth_unit(ids):
    model = _dylora()
    model.train()
    for _, layer in adapter_layers(model):
        layer.adapters["default"].train_rank.fill_(3)
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        row_grad = d.lora_A.weight.grad.abs().sum(1)  # per rank unit
        assert row_grad[:2].sum() == 0 and row_grad[2] > 0 and row_grad[3:].sum() == 0
        assert d.lora_B.weight.grad[:, [0, 1, 3]].abs().sum() == 0 and d.lora_B.weight.grad[:, 2].abs().sum() > 0


def test_dylora_unfrozen_mode_trains_all_units_up_to_b(ids):
    model = _dylora(frozen_lower_ranks=False)
    model.train()
    for _, layer in adapter_layers(model):
        layer.adapters["default"].train_rank.fill_(3)
    model(input_ids=ids, labels=ids).loss.backward()
    d = next(iter(adapter_layers(model)))[1].adapters["default"]
    row_grad = d.lora_A.weight.grad.abs().sum(1)
    assert torch.all(row_grad[:3] > 0) and row_grad[3] == 0


def test_dylora_rank_sampling_is_uniform_and_shared():
    model = _dylora()
    torch.manual_seed(0)
    seen = Counter()
    for step in range(1, 801):
        dylora_on_step(model, "default", step, 800)
        ranks = {int(layer.adapters["default"].train_rank) for _, layer in adapter_layers(model)}
        assert len(ranks) == 1  # one b for every layer
        seen[ranks.pop()] += 1
    assert set(seen) == set(range(1, R + 1))
    assert all(abs(n / 800 - 1 / R) < 0.05 for n in seen.values()), seen


@pytest.mark.parametrize("b", [1, 2, 4])
def test_dylora_eval_at_rank_b_equals_truncated_lora(b, ids):
    model = _dylora()
    set_rank(model, "default", b)
    lora = lk.add_adapter(tiny_llama(), LoraConfig(r=b, lora_alpha=ALPHA, target_modules=TARGETS))
    lora_layers = dict(adapter_layers(lora))
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            d, l = layer.adapters["default"], lora_layers[path].adapters["default"]
            l.lora_A.weight.copy_(d.lora_A.weight[:b])
            l.lora_B.weight.copy_(d.lora_B.weight[:, :b])
    torch.testing.assert_close(model(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_dylora_set_rank_out_of_range_is_refused():
    with pytest.raises(lk.ConfigError, match="rank=5 must be in 1..r=4"):
        set_rank(_dylora(), "default", 5)


def test_dylora_exports_to_peft_at_chosen_rank(ids, tmp_path):
    model = _dylora()
    set_rank(model, "default", 2)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 2 and cfg["lora_alpha"] == ALPHA


def test_dylora_load_with_rank_override(ids, tmp_path):
    model = _dylora()
    lk.save_adapter(model, tmp_path)
    set_rank(model, "default", 3)
    expected = model(input_ids=ids).logits
    fresh = lk.load_adapter(tiny_llama(), tmp_path, config_overrides={"rank": 3})
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    with pytest.raises(lk.ConfigError, match="no setting 'rnak'.*rank"):
        lk.load_adapter(tiny_llama(), tmp_path, config_overrides={"rnak": 3})


@pytest.mark.slow
def test_dylora_cli_train_eval_export_at_rank(tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", "dylora", "--r", "4", "--steps", "3", "--batch-size", "4", "--train-examples",
                 "16", "--eval-examples", "4", "--output", str(out), "--quiet"]) == 0
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", "reverse", "--eval-examples", "3",
                 "--rank", "2"]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["export", str(out / "adapter"), "--output", str(tmp_path / "x"), "--rank", "2"]) == 0
    assert '"r": 2' in (tmp_path / "x" / "adapter_config.json").read_text()


class _OfficialDynamic(torch.nn.Module):
    """A replay of huawei-noah/Efficient-NLP ``DyLoRA/loralib/DyLoRA.py`` class ``dynamic`` (commit bb44348):
    ``forward`` (lines 46-62) in training mode: frozen (lines 48-56) detaches the first ``rank`` columns and keeps
    column ``rank`` trainable; unfrozen (line 58) keeps columns ``:rank+1``; both scale by sqrt(maximum_rank / (rank+1))."""

    def __init__(self, maximum_rank: int, rank: int, frozen: bool):
        super().__init__()
        self.maximum_rank, self.rank, self.frozen = maximum_rank, rank, frozen

    def forward(self, inputs):
        factor = math.sqrt(self.maximum_rank / (self.rank + 1))
        if self.frozen:
            kept = torch.cat([inputs[:, :self.rank].detach(), inputs[:, self.rank].unsqueeze(-1)], dim=-1)
            return kept * factor
        return inputs[:, :self.rank + 1] * factor


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("b", [1, 2, 4])
def test_dylora_gradients_match_the_official_dynamic_module(b, frozen):
    """The update, not only the forward: gradients of A and B for one loss through ours and through the official
    ``Linear.forward`` (``DyLoRA/loralib/layers.py`` lines 174-182: ``lora_A = nd_lora_A(lora_A.T).T``,
    ``lora_B = nd_lora_B(lora_B)``, ``x @ lora_A.T @ lora_B.T * scaling`` with scaling = lora_alpha / r, line 124),
    ``set_rank(b - 1, frozen)`` (lines 139-141: the official rank index is b - 1)."""
    model = _dylora(seed=1, frozen_lower_ranks=frozen)
    _, layer = next(iter(adapter_layers(model)))
    d = layer.adapters["default"].train()
    d.train_rank.fill_(b)
    x = torch.randn(6, d.info.in_features, generator=torch.Generator().manual_seed(2))
    target = torch.randn(6, d.info.out_features, generator=torch.Generator().manual_seed(3))

    A = d.lora_A.weight.detach().clone().requires_grad_(True)  # official lora_A (r, in)
    B = d.lora_B.weight.detach().clone().requires_grad_(True)  # official lora_B (out, r)
    nd_A, nd_B = _OfficialDynamic(R, b - 1, frozen), _OfficialDynamic(R, b - 1, frozen)
    official = x @ nd_A(A.T).T.T @ nd_B(B).T * (ALPHA / R)
    ((official - target) ** 2).sum().backward()

    ours = d(x, torch.zeros(6, d.info.out_features), layer.base_layer)
    ((ours - target) ** 2).sum().backward()
    torch.testing.assert_close(ours, official.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.lora_A.weight.grad, A.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.lora_B.weight.grad, B.grad, atol=1e-6, rtol=1e-5)
