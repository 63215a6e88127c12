"""LoRA-GA (``lorakit/init/lora_ga.py``) against the installed ``peft`` (peft/tuners/lora/loraga.py
``preprocess_loraga`` + layer.py ``lora_ga_init``) and the official repo's formulas
(Outsider565/LoRA-GA peft/src/peft/tuners/lora/layer.py ``lora_ga_init``, lines 171-290: stable scale
``m**0.25 / gamma**0.5`` on both A and B, offset ``W -= s·B A``)."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora.loraga import preprocess_loraga

import lorakit as lk
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 96, (2, 10), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def _peft_lora_ga(batches, **ga):
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(**ga))

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    return peft.get_peft_model(model, config), grads


def _ours(batches, init="lora_ga", **options):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lk.init_adapter(model, "default", batches, init=init, **options)
    return model


def _logits(model, batches):
    with torch.no_grad():
        return model(input_ids=batches[0]["input_ids"]).logits


def test_lora_ga_gradients_match_peft():
    from lorakit.init._common import linear_targets, weight_gradients

    batches = _batches()
    _, ref = _peft_lora_ga(batches)
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS))
    ours = weight_gradients(model, linear_targets(model, "default", "lora_ga"), batches, "lora_ga")
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # nothing kept
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("scale", ["stable", "weight_svd", "gd_scale", "unit"])
@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_lora_ga_factors_and_offset_base_match_peft(scale, direction, seeded_svd):
    batches = _batches()
    ref, _ = _peft_lora_ga(batches, scale=scale, direction=direction)
    ours = _ours(batches, scale=scale, direction=direction)
    ref_sd = peft.get_peft_model_state_dict(ref)
    ours_sd = lk.adapter_state_dict(ours)
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-6, rtol=1e-4)
    ref_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in ref.named_parameters()
                if "lora_" not in n}
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, ref_base[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    # the offset base + adapter equals the untouched model at step 0
    torch.testing.assert_close(_logits(ours, batches), _logits(tiny_llama(), batches), atol=1e-5, rtol=0)


def test_lora_ga_official_scaling_follows_the_repo():
    from lorakit.init._common import linear_targets, weight_gradients

    batches = _batches()
    probe = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS))
    grads = weight_gradients(probe, linear_targets(probe, "default", "lora_ga"), batches, "lora_ga")
    ours = _ours(batches, init="lora_ga_official")
    for path, layer in adapter_layers(ours):
        d = layer.adapters["default"]
        U, _, Vh = torch.linalg.svd(grads[path])
        # ArB2r: A's rows span G's top-r right singular vectors, B's columns the next r left ones
        torch.testing.assert_close(d.lora_A.weight @ Vh[:4].T @ Vh[:4], d.lora_A.weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(U[:, 4:8] @ U[:, 4:8].T @ d.lora_B.weight, d.lora_B.weight, atol=1e-4, rtol=0)
        m = layer.info.out_features
        stable = m ** 0.25 / 16 ** 0.5
        # official: A = Vᵀ[:r]·stable, B = U[:, r:2r]·stable => orthonormal rows/cols times the stable factor
        torch.testing.assert_close(d.lora_A.weight @ d.lora_A.weight.T, stable ** 2 * torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(d.lora_B.weight.T @ d.lora_B.weight, stable ** 2 * torch.eye(4), atol=1e-4, rtol=0)
    assert ours.lorakit.configs["default"].init_lora_weights == "lora_ga_official"
    torch.testing.assert_close(_logits(ours, batches), _logits(tiny_llama(), batches), atol=1e-5, rtol=0)


def test_lora_ga_first_step_follows_the_full_gradient():
    """The paper's claim (§3.2): the first LoRA update ``dB A + B dA`` approximates the full gradient G,
    unlike default LoRA's (random A, B = 0). Measured as the cosine with G on one layer."""
    from lorakit.init._common import linear_targets, weight_gradients

    batches = _batches()
    path = "model.layers.0.self_attn.v_proj"
    probe = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS))
    G = weight_gradients(probe, linear_targets(probe, "default", "lora_ga"), batches, "lora_ga")[path]
    cosine = {}
    for name, model in (("ga", _ours(batches, scale="unit")),
                        ("default", lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))):
        model.train()
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        d = dict(adapter_layers(model))[path].adapters["default"]
        update = d.lora_B.weight.grad @ d.lora_A.weight + d.lora_B.weight @ d.lora_A.weight.grad  # (out, in)
        cosine[name] = float(torch.nn.functional.cosine_similarity(update.flatten(), G.flatten(), dim=0))
    assert cosine["ga"] > 0.5 and cosine["ga"] > 2 * cosine["default"], cosine


def test_lora_ga_base_edit_record_holds_only_the_factors():
    """The record ``W_now = W + s·(−B) A`` keeps A (r, in) and B (out, r) themselves, not the SVD factor V they
    were sliced from (A = Vᵀ[:r] is a view of the (in, 4r) V before the copy)."""
    from lorakit.core.inits import base_edits

    model = _ours(_batches())
    layers = dict(adapter_layers(model))
    for path, edit in base_edits(model, "default").items():
        d = layers[path].adapters["default"]
        for t in (edit.A, edit.B):
            assert t.dtype == torch.float32 and t.untyped_storage().nbytes() == t.numel() * 4
        torch.testing.assert_close(edit.A, d.lora_A.weight)
        torch.testing.assert_close(edit.B, -d.lora_B.weight)


def test_add_adapter_runs_the_gradient_pass_before_the_adapter_exists(monkeypatch):
    """``add_adapter(..., init="lora_ga", init_batches=...)`` estimates the gradients on the plain base model and
    builds the adapter after (PEFT: ``preprocess_loraga`` before ``get_peft_model``), so the backward passes
    never hold the adapter; the result is the one ``init_adapter`` on an attached adapter gives, bit for bit."""
    from lorakit.init import _common

    seen = []
    original = _common.weight_gradients

    def spying(model, targets, batches, init, **kw):
        seen.append(len(list(adapter_layers(model))))
        return original(model, targets, batches, init, **kw)

    monkeypatch.setattr(_common, "weight_gradients", spying)  # the pass target_gradients runs
    batches = _batches()
    torch.manual_seed(3)
    early = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), init="lora_ga",
                           init_batches=batches)
    torch.manual_seed(3)
    late = _ours(batches)
    assert seen == [0, len(TARGETS) * 2]  # tiny_llama has 2 layers: no adapted layer during the first pass
    assert lk.adapter_state_dict(early).keys() == lk.adapter_state_dict(late).keys()
    for k, v in lk.adapter_state_dict(late).items():
        assert torch.equal(lk.adapter_state_dict(early)[k], v), k
    for (n, p), (m, q) in zip(early.named_parameters(), late.named_parameters()):
        assert n == m and torch.equal(p, q), n
    torch.testing.assert_close(_logits(early, batches), _logits(tiny_llama(), batches), atol=1e-5, rtol=0)


def test_add_adapter_whose_gradient_pass_fails_attaches_nothing():
    """A failed pass before the adapter is built leaves the model exactly as it was: no adapter, same weights."""
    from lorakit.core.inits import set_init_options

    model = tiny_llama()
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    no_labels = [{"input_ids": b["input_ids"]} for b in _batches()]
    with pytest.raises(lk.AdapterError, match="needs a loss: batch 0 has no 'labels'"):
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=TARGETS), init="lora_ga", init_batches=no_labels)
    set_init_options(model, "default", direction="ArBB")
    with pytest.raises(lk.ConfigError, match="direction='ArBB' is not one of"):  # options checked before the pass
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=TARGETS), init="lora_ga", init_batches=_batches())
    assert not list(adapter_layers(model)) and lk.adapter_names(model) == []
    assert [n for n, _ in model.named_parameters()] == list(params)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1] and p.grad is None, n
