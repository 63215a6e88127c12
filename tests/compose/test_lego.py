"""LoRA-LEGO (arXiv:2409.16167): MSU pool, k-means centroids, dual reweighting.

Reference values come from the paper's definitions (§3 concatenation-summation equivalence: the pool of all
units sums to Σ ΔW_i; §4 a rank-k LoRA from k centroids), written out here with plain tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from compose.helpers import make_adapter
from lk_models import tiny_llama
from peft import PeftModel

from lorakit.compose import merge_adapters
from lorakit.compose.lego import canonical_units, lego_merge
from lorakit.compose.methods import MergeOptions, ModuleTerms
from lorakit.core.errors import ConfigError


def _terms(ranks=(3, 5), seed=0, out_f=12, in_f=10):
    g = torch.Generator().manual_seed(seed)
    return ModuleTerms(A=[torch.randn(r, in_f, generator=g) for r in ranks],
                       B=[torch.randn(out_f, r, generator=g) for r in ranks],
                       scaling=torch.tensor([0.5, 2.0][:len(ranks)]), weights=torch.tensor([1.0, -0.5][:len(ranks)]))


def test_lego_msu_pool_sums_to_the_weighted_sum():
    t = _terms()
    ua, ub = canonical_units(t)
    expected = sum(w * s * b @ a for a, b, w, s in zip(t.A, t.B, t.weights, t.scaling))
    torch.testing.assert_close(ub.T @ ua, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ua.norm(dim=1), ub.norm(dim=1))  # balanced units


def test_lego_k_equal_to_pool_size_keeps_every_unit_and_scales_output():
    t = _terms()
    expected = sum(w * s * b @ a for a, b, w, s in zip(t.A, t.B, t.weights, t.scaling))
    for reweighting, gamma in (("none", 1.0), ("parameter", 1.0), ("output", math.sqrt(4 / 8)), ("dual", math.sqrt(4 / 8))):
        res = lego_merge(t, MergeOptions(svd_rank=8, extra={"reweighting": reweighting}), None)
        torch.testing.assert_close(res.B @ res.A, gamma * expected, atol=1e-5, rtol=1e-5)


def test_lego_clusters_duplicate_units_into_one_centroid():
    """Two identical adapters: k = r clusters pair each unit with its copy; the centroid is the unit itself, so the
    merge is the adapter once (with dual reweighting: norms already match, γ = √(r̄/k) = 1)."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g)
    t = ModuleTerms(A=[A, A.clone()], B=[B, B.clone()], scaling=torch.ones(2), weights=torch.ones(2))
    res = lego_merge(t, MergeOptions(svd_rank=4), None)
    torch.testing.assert_close(res.B @ res.A, B @ A, atol=1e-4, rtol=1e-4)


def test_lego_parameter_reweighting_restores_member_norms():
    t = _terms(ranks=(6, 6), seed=1)
    res = lego_merge(t, MergeOptions(svd_rank=3, extra={"reweighting": "parameter"}), None)
    plain = lego_merge(t, MergeOptions(svd_rank=3, extra={"reweighting": "none"}), None)
    ua, _ = canonical_units(t)
    # centroids of averaged non-parallel units are shorter than their members; reweighting gives them the mean
    # member norm back (within [min, max] of the unit norms)
    assert (plain.A.norm(dim=1) < res.A.norm(dim=1) + 1e-6).all()
    assert ua.norm(dim=1).min() - 1e-5 <= res.A.norm(dim=1).min() and res.A.norm(dim=1).max() <= ua.norm(dim=1).max() + 1e-5


def test_lego_end_to_end_rank_and_reproduction(tmp_path, ids):
    src = make_adapter(tiny_llama, tmp_path / "a", 0, r=4, lora_alpha=8)
    other = make_adapter(tiny_llama, tmp_path / "b", 1, r=4, lora_alpha=8)
    merged = merge_adapters([src, other], [0.5, 0.5], "lego", model=tiny_llama(), svd_rank=3)
    assert merged.config.r == 3 and merged.recipe["method"] == "lego"
    out = merge_adapters([src], [1.0], "lego", model=tiny_llama()).save(tmp_path / "one")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), str(src))(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), str(out))(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_lego_bad_reweighting():
    with pytest.raises(ConfigError, match="reweighting"):
        lego_merge(_terms(), MergeOptions(extra={"reweighting": "both"}), None)
