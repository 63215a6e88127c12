"""LoRA, rsLoRA and DoRA (``methods/lora.py``) against the papers' formulas, computed here from the weights.

- LoRA (arXiv:2106.09685, eq. 3): ``h = W x + (α/r) B A x``, A Kaiming-uniform, B zero.
- rsLoRA (arXiv:2312.03732, §3): scaling ``α / √r``.
- DoRA (arXiv:2402.09353, eq. 5): ``W' = m (W + ΔW) / ‖W + ΔW‖_c`` with m initialised to ``‖W‖_c``; ``‖·‖_c``
  is the norm of each output row of the (out, in) weight (PEFT's layout: peft/tuners/lora/dora.py
  ``get_weight_norm``).
PEFT parity of files and outputs is in tests/io/test_peft_interop.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.core.model import adapter_layers
from lorakit.methods.lora import LoraConfig, build_lora

from lk_models import tiny_llama

INFO = LayerInfo("linear", 12, 7, False)


def _base(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(12, 7)


def _nonzero(delta, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return delta


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_output_is_w_x_plus_scaled_b_a_x(rslora):
    base = _base()
    delta = _nonzero(build_lora(base, INFO, LoraConfig(r=3, lora_alpha=6, use_rslora=rslora)))
    scaling = 6 / (math.sqrt(3) if rslora else 3)
    x = torch.randn(4, 12)
    want = (delta.lora_B.weight @ delta.lora_A.weight @ x.T).T * scaling
    torch.testing.assert_close(delta(x, base(x), base), want)
    torch.testing.assert_close(delta.delta_weight(), scaling * delta.lora_B.weight @ delta.lora_A.weight)


def test_init_choices():
    torch.manual_seed(0)
    kaiming = build_lora(_base(), INFO, LoraConfig(r=4))
    assert torch.count_nonzero(kaiming.lora_B.weight) == 0
    assert kaiming.lora_A.weight.abs().max() <= 1 / math.sqrt(12)  # kaiming_uniform(a=√5): bound 1/√fan_in
    gaussian = build_lora(_base(), INFO, LoraConfig(r=4, init_lora_weights="gaussian"))
    assert torch.count_nonzero(gaussian.lora_B.weight) == 0
    assert abs(float(gaussian.lora_A.weight.detach().std()) - 1 / 4) < 0.1  # N(0, 1/r)
    random_b = build_lora(_base(), INFO, LoraConfig(r=4, init_lora_weights=False))
    assert torch.count_nonzero(random_b.lora_B.weight) > 0


def test_dora_is_magnitude_times_normalised_updated_weight():
    base = _base()
    delta = build_lora(base, INFO, LoraConfig(r=3, lora_alpha=6, use_dora=True))
    torch.testing.assert_close(delta.lora_magnitude_vector, base.weight.norm(dim=1))  # m = ‖W‖_c at init
    _nonzero(delta)
    x = torch.randn(5, 12)
    updated = base.weight + 2.0 * delta.lora_B.weight @ delta.lora_A.weight  # W + ΔW, s = 6/3
    w_prime = delta.lora_magnitude_vector[:, None] * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(base(x) + delta(x, base(x), base), x @ w_prime.T + base.bias, atol=1e-5, rtol=1e-5)


def test_rank_and_alpha_patterns_pick_per_module_values():
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    model = lk.add_adapter(tiny_llama(), LoraConfig(**{**config.to_dict(), "target_modules": ["q_proj", "v_proj"]}))
    got = {path: (d.r, d.scaling) for path, layer in adapter_layers(model) for d in [layer.adapters["default"]]}
    assert got["model.layers.0.self_attn.v_proj"] == (2, 4.0)
    assert got["model.layers.1.self_attn.q_proj"] == (4, 0.75)
    assert got["model.layers.0.self_attn.q_proj"] == (4, 2.0)


def test_embedding_layout_and_bias():
    model = lk.add_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"]))
    (delta,) = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    assert delta.lora_embedding_A.shape == (2, 96) and delta.lora_embedding_B.shape == (32, 2)
    assert torch.count_nonzero(delta.lora_embedding_A) == 0  # PEFT: A zero, B normal for embeddings
    with pytest.raises(lk.ConfigError, match="lora_bias"):
        lk.add_adapter(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    biased = _nonzero(build_lora(_base(), INFO, LoraConfig(r=2, lora_bias=True)))
    x = torch.randn(3, 12)
    want = (x @ biased.lora_A.weight.T @ biased.lora_B.weight.T + biased.lora_B.bias) * biased.scaling
    torch.testing.assert_close(biased(x, torch.zeros(3, 7), None), want)


@pytest.mark.parametrize("other", [dict(use_dora=True), dict(init_lora_weights="gaussian"),
                                   dict(init_lora_weights="pissa")], ids=["dora", "gaussian", "pissa"])
def test_lora_bias_pairs_peft_refuses_are_refused(other):
    """PEFT's LoraConfig.__post_init__ (peft/tuners/lora/config.py, the ``if self.lora_bias:`` block) raises for
    lora_bias=True with use_dora=True or with init_lora_weights other than True/False, so a file lorakit wrote with
    such a pair could not be loaded by PEFT: the config refuses the pair up front."""
    from peft import LoraConfig as PeftLoraConfig

    with pytest.raises(ValueError, match="lora_bias"):
        PeftLoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, **other)
    with pytest.raises(lk.ConfigError, match="lora_bias"):
        LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, **other)
    LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)  # PEFT accepts these
