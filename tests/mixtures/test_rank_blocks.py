"""mixtures.rank_blocks: N LoRA experts stacked as rank blocks equal a sum over separate LoRAs, each scaled as LoRA
(alpha / r, Hu et al. arXiv:2106.09685 eq. 3) or rsLoRA (alpha / √r, Kalajdzievski arXiv:2312.03732 thm. 3.2)."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.mixtures.rank_blocks import LoraExperts, LoraExpertsConfig

INFO = LayerInfo("linear", 8, 6, False)
CONFIG = dict(expert_r=[2, 3, 1], expert_alpha=[4.0, 3.0, 5.0], expert_use_rslora=[False, True, False])


def separate_experts(seed=0):
    """Three independent LoRAs (A (r, in), B (out, r)) with non-zero B, and their scalings from the formulas."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for r, alpha, rs in zip(CONFIG["expert_r"], CONFIG["expert_alpha"], CONFIG["expert_use_rslora"]):
        A, B = torch.randn(r, INFO.in_features, generator=g), torch.randn(INFO.out_features, r, generator=g)
        experts.append((A, B, alpha / math.sqrt(r) if rs else alpha / r))
    return experts


def test_mixed_equals_the_weighted_sum_of_separate_loras():
    delta = LoraExperts(INFO, LoraExpertsConfig(**CONFIG), trainable=True)
    experts = separate_experts()
    for e, (A, B, _) in enumerate(experts):
        delta.set_expert(e, A, B)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, INFO.in_features, generator=g), torch.rand(2, 5, 3, generator=g)
    want = sum(w[..., e, None] * s * (x @ A.T @ B.T) for e, (A, B, s) in enumerate(experts))
    torch.testing.assert_close(delta.mixed(x, w), want, atol=1e-5, rtol=1e-5)
    one_hot = torch.tensor([0.0, 1.0, 0.0])  # broadcast over tokens: expert 1 alone
    A, B, s = experts[1]
    torch.testing.assert_close(delta.mixed(x, one_hot), s * (x @ A.T @ B.T), atol=1e-5, rtol=1e-5)


def test_fresh_experts_add_nothing_and_frozen_experts_name_their_factors():
    delta = LoraExperts(INFO, LoraExpertsConfig(**CONFIG), trainable=False)
    x = torch.randn(3, INFO.in_features)
    assert torch.equal(delta.mixed(x, torch.ones(3)), torch.zeros(3, INFO.out_features))  # B = 0
    assert delta.frozen_names() == ("lora_A", "lora_B")
    assert LoraExperts(INFO, LoraExpertsConfig(**CONFIG), trainable=True).frozen_names() == ()


def test_bad_input_names_the_problem():
    delta = LoraExperts(INFO, LoraExpertsConfig(**CONFIG), trainable=True)
    with pytest.raises(lk.AdapterLoadError, match=r"expert 1: .*expected \(3, 8\), \(6, 3\)"):
        delta.set_expert(1, torch.zeros(2, 8), torch.zeros(6, 2))
    # an expert read from a folder is named by the folder and module (load_sources), not by its index
    with pytest.raises(lk.AdapterLoadError, match=r"^source adapter /runs/b \(module 'q_proj'\): LoRA factors"):
        delta.set_expert(1, torch.zeros(2, 8), torch.zeros(6, 2), source="/runs/b (module 'q_proj')")
    with pytest.raises(lk.ConfigError, match="num_experts=3 but 2 adapter_paths"):
        LoraExpertsConfig(adapter_paths=["a", "b"], num_experts=3)
    with pytest.raises(lk.ConfigError, match="expert_alpha has 1 entries for 2 experts"):
        LoraExpertsConfig(num_experts=2, expert_alpha=[1.0])
    assert LoraExpertsConfig(num_experts=2).expert_r == [8, 8]
