"""MiSS / Bone: parity with HF PEFT's MiSS (real ``peft`` package) for the default, mini and bat variants, and
adapter files both ways."""

from __future__ import annotations

import pytest
import torch
from peft import MissConfig as PeftMissConfig
from peft import PeftModel, get_peft_model

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.miss import MissConfig

from lk_models import assert_trains_only, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32→32, 32→16, 64→32
# r=6 exercises PEFT's zero-padding path (32 % 6 != 0) for the default variant
VARIANTS = {"default": dict(r=6), "mini": dict(r=8, init_weights="mini", mini_r=4),
            "bat": dict(r=8, init_weights="bat")}


def _randomised_peft(kw, seed=0):
    peft_model = get_peft_model(tiny_llama(), PeftMissConfig(target_modules=TARGETS, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "miss_block" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_miss_peft_file_loads_with_identical_outputs(variant, ids, tmp_path):
    peft_model = _randomised_peft(VARIANTS[variant])
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    # merged weights agree with PEFT's merge (peft/tuners/miss/layer.py MissLinear.merge)
    merged_ref = peft_model.merge_and_unload().state_dict()
    merged = lk.merge_and_unload(model).state_dict()
    for k in merged_ref:
        torch.testing.assert_close(merged[k], merged_ref[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_miss_file_loads_in_peft(variant, ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), MissConfig(target_modules=TARGETS, **VARIANTS[variant]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            d = layer.adapters["default"].miss_block
            d.copy_(torch.randn(d.shape, generator=g) * 0.1)
    expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_miss_delta_is_shard_shared_block(ids):
    model = lk.add_adapter(tiny_llama(), MissConfig(r=6, init_weights=False, target_modules=["q_proj"]))
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        D = d.miss_block.detach()
        # peft/tuners/miss/layer.py get_delta_weight_miss: W_blocks + miss_B per r-wide input shard; the
        # remainder columns get miss_B.T[:, :remainder]  =>  ΔW[o, i] = D[i mod r, o]
        expected = torch.stack([D[i % 6] for i in range(32)], dim=1)
        torch.testing.assert_close(d.delta_weight(), expected, atol=0, rtol=0)
        assert D.abs().sum() > 0  # init_weights=False: Kaiming-random D


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_miss_starts_at_base_and_trains_only_block(variant, ids):
    ref = tiny_llama()(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), MissConfig(target_modules=TARGETS, **VARIANTS[variant]))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)
    assert_trains_only(model, ids, ["miss_block"])


def test_miss_config_errors():
    with pytest.raises(lk.ConfigError, match="bat"):
        MissConfig(init_weights="bta")
    with pytest.raises(lk.TargetError, match="divisible"):
        lk.add_adapter(tiny_llama(), MissConfig(r=6, init_weights="bat", target_modules=TARGETS))


def _adamw_steps(model, ids, lr, steps=3):
    """``steps`` AdamW steps (clipped at norm 1, as lorakit train) of the LM loss on ``ids``; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_miss_training_steps_match_peft(variant, ids, tmp_path):
    # The reference trajectory is real PEFT's MissLinear.forward (peft/tuners/miss/layer.py, the miss / mini branch
    # lines 359-372, the bat branch lines 345-354 with get_delta_weight lines 256-266) under the same optimizer: a
    # lorakit run (e.g. the CLI's lr 3e-3 on r=64) behaves as PEFT's would, gradients and Adam steps included.
    lr = 3e-3
    peft_model = get_peft_model(tiny_llama(), PeftMissConfig(target_modules=TARGETS, **VARIANTS[variant]))
    ref_losses = _adamw_steps(peft_model, ids, lr)
    model = lk.add_adapter(tiny_llama(), MissConfig(target_modules=TARGETS, **VARIANTS[variant]))
    losses = _adamw_steps(model, ids, lr)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # the steps did train (PEFT's run)
    peft_model.eval()
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)
    # and the trained blocks are the same tensors under the same names (PEFT loads lorakit's file to the same outputs)
    lk.save_adapter(model, tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)
