"""RandLoRA: parity with HF PEFT's RandLoRA (real ``peft`` package) — same seed and weights, files both ways."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import RandLoraConfig as PeftRandLoraConfig
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.randlora import RandLoraConfig

from lk_models import assert_trains_only, tiny_gpt2, tiny_llama

# q_proj 32→32, v_proj 32→16, down_proj 64→32: both orientations (in = min and out = min) and sliced bases
TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {"llama": (tiny_llama, TARGETS), "gpt2": (tiny_gpt2, ["c_attn", "c_proj"])}
VARIANTS = {"dense": {}, "sparse": {"sparse": True}, "very_sparse": {"very_sparse": True}}


def _peft_model(factory, targets, **kw):
    cfg = PeftRandLoraConfig(r=4, randlora_alpha=8, target_modules=targets, init_weights=False, **kw)
    return get_peft_model(factory(), cfg).eval()


def _copy_peft_weights_into(model, peft_model):
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            d = layer.adapters["default"]
            for name in ("randlora_lambda", "randlora_gamma"):
                getattr(d, name).copy_(peft_params[f"base_model.model.{path}.{name}.default"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_randlora_matches_peft_outputs_and_bases(case, variant, ids):
    factory, targets = CASES[case]
    peft_model = _peft_model(factory, targets, **VARIANTS[variant])
    model = lk.add_adapter(factory(), RandLoraConfig(r=4, randlora_alpha=8, target_modules=targets,
                                                     **VARIANTS[variant]))
    pa, pb = peft_model.base_model.randlora_A["default"], peft_model.base_model.randlora_B["default"]  # shared
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        # peft/tuners/randlora/layer.py get_scaled_bases (sliced_A = randlora_A[:, :num_bases, :min_dim], ...)
        torch.testing.assert_close(d.randlora_A, pa[:, :, : d.min_dim], atol=0, rtol=0)
        torch.testing.assert_close(d.randlora_B, pb[: d.max_dim, : d.n], atol=0, rtol=0)
    _copy_peft_weights_into(model, peft_model)
    torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)
    peft_layers = {n[len("base_model.model."):]: m for n, m in peft_model.named_modules() if hasattr(m, "get_delta_weight")}
    for path, layer in adapter_layers(model):
        expected = peft_layers[path].get_delta_weight("default")  # (out, in), or (in, out) for Conv1D
        if layer.info.fan_in_fan_out:
            expected = expected.T
        torch.testing.assert_close(layer.adapters["default"].delta_weight(), expected, atol=1e-5, rtol=0)


def test_randlora_loads_peft_file(ids, tmp_path):
    peft_model = _peft_model(tiny_llama, TARGETS)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.randlora_A" in saved  # PEFT's file carries the bases (save_projection=True)
    model = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)
    for path, layer in adapter_layers(model):  # the skipped bases equal the regenerated ones
        d = layer.adapters["default"]
        torch.testing.assert_close(d.randlora_B, saved[f"base_model.model.{path}.randlora_B"][: d.max_dim, : d.n])


def test_randlora_file_loads_in_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS,
                                                        init_weights=False))
    expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(k.endswith(("randlora_A", "randlora_B")) for k in saved)  # bases are never saved
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RANDLORA"
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_randlora_trains_only_scalings_and_is_full_rank(ids):
    model = lk.add_adapter(tiny_llama(), RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS,
                                                        init_weights=False))
    assert_trains_only(model, ids, ["randlora_lambda", "randlora_gamma"])
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        # paper §3: n = ceil(min(in,out)/r) bases, n·(r + d_min) trained parameters, a full-rank ΔW
        assert d.randlora_lambda.numel() + d.randlora_gamma.numel() == d.n * (d.r + d.min_dim)
        assert torch.linalg.matrix_rank(d.delta_weight().double()) == d.min_dim


def test_randlora_config_errors():
    with pytest.raises(lk.ConfigError, match="sparse"):
        RandLoraConfig(sparse=True, very_sparse=True)
    with pytest.raises(lk.ConfigError, match="r must be"):
        RandLoraConfig(r=0)


def test_randlora_fused_and_dense_paths_match_peft_values_and_gradients(monkeypatch):
    """Enough tokens (4×64) that lorakit takes its ΔW paths (fused into the base weight when RandLoRA is the only
    adapter; separate ΔW otherwise): logits and the gradients of λ and γ equal PEFT's factored forward
    (peft/tuners/randlora/layer.py ``forward``: ``F.linear(F.linear(dropout(x), update_B), update_A)``)."""
    from lorakit.methods.randlora import RandLoraLinear

    calls = []
    fused = RandLoraLinear.fused_forward

    def spy(self, x, base_layer):
        out = fused(self, x, base_layer)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(RandLoraLinear, "fused_forward", spy)
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    peft_model = _peft_model(tiny_llama, TARGETS)
    model = lk.add_adapter(tiny_llama(), RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS))
    _copy_peft_weights_into(model, peft_model)
    ours, theirs = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert calls and all(calls)  # every adapted layer took the fused path
    ours.square().mean().backward()
    theirs.square().mean().backward()
    peft_params = dict(peft_model.named_parameters())
    for path, layer in adapter_layers(model):
        for name in ("randlora_lambda", "randlora_gamma"):
            torch.testing.assert_close(getattr(layer.adapters["default"], name).grad,
                                       peft_params[f"base_model.model.{path}.{name}.default"].grad, atol=1e-5, rtol=1e-3)
    # a second active adapter: no fusion, the separate ΔW path gives the same logits
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=TARGETS), name="zero")  # B = 0: adds nothing
    lk.set_adapter(model, ["default", "zero"])
    calls.clear()
    torch.testing.assert_close(model(input_ids=ids).logits, theirs, atol=1e-4, rtol=1e-4)
    assert not any(calls)
