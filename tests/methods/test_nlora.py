"""SLoRA / NLoRA / IntTune: the B N A structure, Nyström init from W, IntTune training only N."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.nlora import InttuneConfig, NloraConfig, SloraConfig

from lk_models import assert_exports_to_peft, assert_trains_only, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}


@pytest.mark.parametrize("config_cls", [NloraConfig, InttuneConfig], ids=["nlora", "inttune"])
def test_nlora_inttune_nystrom_init_copies_W_blocks(config_cls, ids):
    r, alpha = 4, 8
    base = tiny_llama()
    weights = _weights(base)
    base_out = base(input_ids=ids).logits.detach()
    model = lk.add_adapter(base, config_cls(r=r, lora_alpha=alpha, target_modules=TARGETS))
    for path, layer in adapter_layers(model):
        d, W = layer.adapters["default"], weights[path]
        # Official code/peft/src/peft/tuners/lora/layer.py nlora_init: lora_N = W[:r, :r], lora_A = W[:r, :],
        # lora_B = W[:, :r]; get_delta_weight: B @ N @ A * scaling (scaling = alpha / r).
        assert torch.equal(d.lora_N.weight, W[:r, :r])
        assert torch.equal(d.lora_A.weight, W[:r, :])
        assert torch.equal(d.lora_B.weight, W[:, :r])
        torch.testing.assert_close(d.delta_weight(), W[:, :r] @ W[:r, :r] @ W[:r, :] * (alpha / r))
    # no base correction (as the official code): the model changes at step 0
    assert (model(input_ids=ids).logits - base_out).abs().max() > 0


def test_inttune_trains_only_N(ids):
    assert_trains_only(lk.add_adapter(tiny_llama(), InttuneConfig(r=4, target_modules=TARGETS)), ids, ["lora_N.weight"])


def test_nlora_trains_all_three(ids):
    model = lk.add_adapter(tiny_llama(), NloraConfig(r=4, target_modules=TARGETS))
    names = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_N", "lora_B"}


def test_slora_init_and_zero_start(ids):
    base_out = tiny_llama()(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), SloraConfig(r=4, target_modules=TARGETS))
    torch.testing.assert_close(model(input_ids=ids).logits, base_out, atol=1e-6, rtol=0)
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        # layer.py slora_init: A, N kaiming_uniform(a=sqrt(5)) => U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0
        assert torch.all(d.lora_B.weight == 0)
        assert d.lora_N.weight.abs().max() <= 1 / math.sqrt(4) and d.lora_N.weight.abs().max() > 0
        assert d.lora_A.weight.abs().max() <= 1 / math.sqrt(d.lora_A.in_features)


@pytest.mark.parametrize("config_cls", [SloraConfig, NloraConfig, InttuneConfig], ids=["slora", "nlora", "inttune"])
def test_nlora_family_exports_to_peft(config_cls, ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), config_cls(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters["default"].parameters():
                p.add_(torch.randn_like(p) * 0.3)
    assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
