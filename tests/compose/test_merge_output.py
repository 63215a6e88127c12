"""merge_adapters writes its result straight into PEFT's file layout (no temporary adapter on the model): the
tensors must be exactly what lorakit itself saves for that adapter, and ``cat`` exactly the concatenated factors.

References: the LoRA forward ``ΔW = s · B A`` with ``s = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA;
per-module r / α from ``rank_pattern`` / ``alpha_pattern``) — Hu et al., arXiv:2106.09685 eq. 3; Kalajdzievski,
arXiv:2312.03732 — and the concatenation-summation identity ``[w_1 s_1 B_1, …, w_N s_N B_N] [A_1; …; A_N] =
Σ_i w_i s_i B_i A_i`` (LoRA-LEGO, arXiv:2409.16167 §3; PEFT ``add_weighted_adapter(combination_type="cat")``),
evaluated here from the source files' tensors and configs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from compose.helpers import make_adapter
from compose.test_merge import VARIANTS, peft_output
from lk_models import tiny_llama
from safetensors.torch import load_file

import lorakit as lk
from lorakit.compose import merge_adapters
from lorakit.compose.merge import RECIPE_FIELD

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return {name: make_adapter(tiny_llama, d / name, seed, **cfg) for seed, (name, cfg) in enumerate(VARIANTS.items())}


def _scaling(config: dict, module: str) -> float:
    """s of one module from an adapter_config.json (PEFT's rank_pattern / alpha_pattern suffix rule)."""
    def pattern(patterns, default):
        return next((v for k, v in patterns.items() if module == k or module.endswith("." + k)), default)

    r, alpha = pattern(config["rank_pattern"], config["r"]), pattern(config["alpha_pattern"], config["lora_alpha"])
    return alpha / (math.sqrt(r) if config["use_rslora"] else r)


def test_cat_factors_are_the_sources_concatenated(sources):
    names, weights = ["plain", "rslora_patterns", "lora_bias"], [0.7, -1.3, 0.4]
    merged = merge_adapters([sources[n] for n in names], weights, "cat", model=tiny_llama())
    files = [load_file(sources[n] / "adapter_model.safetensors") for n in names]
    configs = [json.loads((sources[n] / "adapter_config.json").read_text()) for n in names]
    modules = sorted({k[len(PREFIX):].rsplit(".lora_A", 1)[0] for k in files[0] if ".lora_A." in k})
    assert modules and {f"{PREFIX}{m}.lora_A.weight" for m in modules} <= set(merged.state_dict)
    for m in modules:
        key_a, key_b, key_bias = (f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight", f"{PREFIX}{m}.lora_B.bias")
        coef = [torch.tensor(w, dtype=torch.float32) * torch.tensor(_scaling(c, m), dtype=torch.float32)
                for w, c in zip(weights, configs)]  # w_i s_i in float32, as the forward multiplies
        A, B = merged.state_dict[key_a], merged.state_dict[key_b]
        assert torch.equal(A, torch.cat([f[key_a] for f in files], 0))  # (Σ r_i, in)
        assert torch.equal(B, torch.cat([f[key_b] * c for f, c in zip(files, coef)], 1))  # (out, Σ r_i)
        expected = sum(c * f[key_b] @ f[key_a] for f, c in zip(files, coef))  # Σ w_i s_i B_i A_i
        torch.testing.assert_close(B @ A, expected, atol=1e-6, rtol=1e-5)
        bias = sum(c * f[key_bias] for f, c in zip(files, coef) if key_bias in f)  # only lora_bias has one
        torch.testing.assert_close(merged.state_dict[key_bias], bias, atol=1e-7, rtol=1e-6)
    assert merged.config.lora_alpha == merged.config.r  # scaling 1: ΔW is B @ A as stored


def _resaved(path, dtype=None):
    """What lorakit itself saves for the merged folder: load it onto a fresh base, read its file tensors/config."""
    model = tiny_llama() if dtype is None else tiny_llama().to(dtype)
    lk.load_adapter(model, path)
    from lorakit.io.peft_format import config_file_dict

    return lk.adapter_state_dict(model), config_file_dict(model)


@pytest.mark.parametrize("method,group", [("cat", ["plain", "rslora_patterns", "lora_bias"]),
                                          ("svd", ["embedding", "plain"]),
                                          ("ties", ["plain", "lora_bias"]),
                                          ("linear", ["dora_embedding", "embedding"]),
                                          ("cat", ["dora", "plain"])])
def test_merged_files_are_what_lorakit_saves(method, group, sources, tmp_path):
    from lorakit.compose import METHODS

    options = {k: v for k, v in dict(density=0.5, svd_rank=3).items() if k in METHODS[method].reads}
    merged = merge_adapters([sources[n] for n in group], [0.6, -0.5, 1.2][:len(group)], method, model=tiny_llama(),
                            **options)
    state, config = _resaved(merged.save(tmp_path / "m"))
    assert list(state) == list(merged.state_dict)
    for k, v in state.items():
        got = merged.state_dict[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    written = dict(merged.config_dict)
    assert written.pop(RECIPE_FIELD)["method"] == method
    assert written == config


def test_half_precision_base_gets_float32_factors(sources, tmp_path):
    """As plan_adapter's autocast_adapter_dtype: a bf16 base takes float32 adapter tensors."""
    model = tiny_llama().to(torch.bfloat16)
    merged = merge_adapters([sources["plain"], sources["lora_bias"]], None, "cat", model=model)
    assert {v.dtype for v in merged.state_dict.values()} == {torch.float32}
    state, _ = _resaved(merged.save(tmp_path / "m"), torch.bfloat16)
    assert all(torch.equal(state[k], v) for k, v in merged.state_dict.items())


def test_dora_result_keeps_modules_without_a_dora_source_exact(sources, ids, tmp_path):
    """A DoRA source makes the result DoRA on every module; where only plain sources adapt a module, its magnitude
    must be ‖W + ΔW‖_row (DoRA forward = W + ΔW), so weights [0, 1] give the plain adapter back exactly."""
    merged = merge_adapters([sources["dora_embedding"], sources["embedding"]], [0.0, 1.0], "linear",
                            model=tiny_llama())
    assert merged.config.use_dora
    out = merged.save(tmp_path / "m")
    torch.testing.assert_close(peft_output([out], ids), peft_output([sources["embedding"]], ids), atol=2e-5, rtol=1e-4)


def test_merge_leaves_the_model_as_it_was(sources):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapters([sources["plain"], sources["dora"]], None, "linear", model=model)
    assert lk.adapter_names(model) == [] and set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
