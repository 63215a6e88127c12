"""LaMDA++: LaMDA with per-module ranks split by the normalised energy of each weight's top-r spectrum (arXiv:2406.12832
abstract; the proportional rule is ours, see lorakit/methods/lamda.py)."""

from __future__ import annotations

import copy
import json

import torch

import lorakit as lk
from lorakit.core.model import adapter_layers, adapter_state
from lorakit.methods.lamda import allocate_ranks

from lk_models import assert_exports_to_peft, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _deltas(model, name="default"):
    return [layer.adapters[name] for _, layer in adapter_layers(model)]


def test_lamda_pp_rank_split_is_proportional_and_capped():
    ranks = allocate_ranks({"a": 0.9, "b": 0.6, "c": 0.3}, budget=12, caps={"a": 4, "b": 16, "c": 16})
    assert ranks == {"a": 4, "b": 4, "c": 2}  # 6, 4, 2 before a's cap of 4


def test_lamda_pp_allocates_ranks_by_spectral_energy(ids, tmp_path):
    base = tiny_llama()
    with torch.no_grad():  # make layer 0's q_proj nearly rank 2: its top-r energy is the highest
        w = base.model.layers[0].self_attn.q_proj.weight
        U, S, Vh = torch.linalg.svd(w)
        w.copy_(U[:, :2] @ torch.diag(S[:2] * 10) @ Vh[:2] + 0.01 * w)
    clean = copy.deepcopy(base)
    model = lk.add_adapter(base, lk.get_method("lamda_pp").config_cls(r=4, target_modules=TARGETS))
    pattern = adapter_state(model).configs["default"].rank_pattern
    assert sum(pattern.values()) == 4 * 6  # the uniform budget r · #modules
    assert max(pattern, key=pattern.get) == "model.layers.0.self_attn.q_proj"
    for path, layer in adapter_layers(model):
        assert layer.adapters["default"].r == pattern[path]
    with torch.no_grad():
        for d in _deltas(model):
            d.sigma.weight.normal_()
    lk.save_adapter(model, tmp_path / "pp")
    assert json.loads((tmp_path / "pp" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    cfg = assert_exports_to_peft(model, "default", lambda: copy.deepcopy(clean), ids, tmp_path / "lora")
    assert cfg["r"] in pattern.values()
