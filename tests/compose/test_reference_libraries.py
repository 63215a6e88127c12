"""Merge methods against the real reference libraries, on the same deltas.

mergekit (installed; v0.1.5): its merge methods run on full weights ``base`` and ``base + ΔW_i``; the reference
ΔW is their output minus ``base`` (mergekit/merge_methods/generalized_task_arithmetic.py
``GeneralizedTaskArithmeticMerge.merge_group``, sce.py ``sce_merge``). DARE/DELLA draw one Bernoulli mask per
source in source order from torch's global generator (sparsify.py ``bernoulli`` / ``della_magprune``); lorakit
draws the stacked masks in one call from a generator seeded with ``seed`` — the same stream, so after
``torch.manual_seed(seed)`` the masks are identical and the results equal.

PEFT (installed; 0.21): ``add_weighted_adapter`` with ``cat`` / ``svd`` on plain LoRA adapters (where PEFT is
right), and rsLoRA / lora_bias sources, where PEFT's result does not reproduce the source
(peft/tuners/lora/model.py ``add_weighted_adapter``: the new config is the first adapter's with
``lora_alpha = r``, so an rsLoRA result is scaled by √r; the new lora_B bias stays zero; a DoRA result keeps the
magnitude initialised for the new adapter's random init — peft issue #3761).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from compose.helpers import make_adapter
from lk_models import tiny_llama
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorBatch, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod
from peft import PeftModel

from lorakit.compose import METHODS, merge_adapters
from lorakit.compose.methods import MergeOptions, ModuleTerms


def _terms(n=3, out_f=24, in_f=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [3, 5, 4][:n]
    A = [torch.randn(r, in_f, generator=g) for r in ranks]
    B = [torch.randn(out_f, r, generator=g) for r in ranks]
    return ModuleTerms(A=A, B=B, scaling=torch.tensor([0.5, 2.0, 1.5][:n]), weights=torch.tensor([0.7, 0.2, 1.1][:n]))


def _base(terms):
    return torch.randn(terms.B[0].shape[0], terms.A[0].shape[1], generator=torch.Generator().manual_seed(99))


def _mergekit(method, terms, params, seed=0):
    """mergekit's merge of ``base + τ_i``, taken in the layer's stored layout (``terms.to_stored``: GPT-2 Conv1D
    (in, out), a convolution's (out, in, *kernel)), returned as ΔW (out, in)."""
    tv = terms.to_stored(terms.task_vectors())  # (N, *stored)
    base = torch.randn(tv.shape[1:], generator=torch.Generator().manual_seed(99))
    group = TensorGroup.from_tensors([base, *(base + t for t in tv)], base_index=0)
    ids = [e.id for e in group.non_base]
    names = {p.name for p in method.spec.parameters}
    defaults = {p.name: p.default for p in method.spec.parameters if p.name not in ("weight", "density", "gamma", "epsilon")}
    per_source = {"weight": {i: float(w) for i, w in zip(ids, terms.weights)}} if "weight" in names else {}
    for key in ("density", "gamma", "epsilon"):
        if key in params:
            per_source[key] = {i: params[key] for i in ids}
    torch.manual_seed(seed)
    kwargs = {**defaults, **{k: v for k, v in params.items() if k not in ("density", "gamma", "epsilon")}, **per_source}
    return terms.from_stored((method.merge_group(group, **kwargs) - base)[None])[0]


CASES = {  # lorakit method -> (mergekit method, lorakit options, mergekit parameters)
    "task_arithmetic": ("task_arithmetic", {}, {}),
    "ties": ("ties", {"density": 0.4}, {"density": 0.4}),
    "ties_frequency": ("ties", {"density": 0.4, "majority_sign_method": "frequency"}, {"density": 0.4}),
    "dare_linear": ("dare_linear", {"density": 0.6, "rescale": "l1", "seed": 7}, {"density": 0.6}),
    "dare_ties": ("dare_ties", {"density": 0.6, "rescale": "l1", "seed": 7}, {"density": 0.6}),
    "della": ("della", {"density": 0.5, "epsilon": 0.2, "seed": 5}, {"density": 0.5, "epsilon": 0.2}),
    "della_linear": ("della_linear", {"density": 0.5, "epsilon": 0.2, "seed": 5}, {"density": 0.5, "epsilon": 0.2}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.7, "gamma": 0.05}, {"density": 0.7, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}, {"density": 0.7, "gamma": 0.05}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_mergekit_on_full_weights(case):
    mk_name, opts, params = CASES[case]
    terms = _terms()
    method = registry.get(mk_name)
    if case == "ties_frequency":  # mergekit's consensus "count" is PEFT's majority_sign_method "frequency"
        method = dataclasses.replace(method, consensus_method=ConsensusMethod.count)
    expected = _mergekit(method, terms, params, seed=opts.get("seed", 0))
    lk_name = case.removesuffix("_frequency")
    o = MergeOptions(**opts)
    res = METHODS[lk_name].merge(terms, o, torch.Generator().manual_seed(o.seed))
    got = res.B @ res.A if hasattr(res, "A") else res.delta
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [{"stored_transposed": True}, {"stored_kernel": (2, 2)}],
                         ids=["conv1d_in_out", "conv2d_kernel"])
@pytest.mark.parametrize("case", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_masks_and_della_rows_follow_the_stored_layout(case, layout):
    """mergekit draws DARE/DELLA masks over the stored weight and DELLA ranks along its dim 1
    (sparsify.py ``bernoulli``, ``della_magprune``: ``argsort(dim=1)``): for a GPT-2 Conv1D that is (in, out),
    for a convolution (out, in, kh, kw). lorakit drew and ranked over its (out, in) view: other masks for the same
    seed, and DELLA ranked other entries against each other."""
    mk_name, opts, params = CASES[case]
    terms = dataclasses.replace(_terms(), **layout)  # in 20 = 5 channels x 2 x 2 for the kernel layout
    expected = _mergekit(registry.get(mk_name), terms, params, seed=opts["seed"])
    o = MergeOptions(**opts)
    got = METHODS[case].merge(terms, o, torch.Generator().manual_seed(o.seed)).delta
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_linear_equals_mergekit_linear():
    terms = _terms()
    base = _base(terms)
    batch = TensorBatch(tensors=[(base + t)[None] for t in terms.task_vectors()])  # [output=1, out, in] per input
    expected = registry.get("linear").implementation(batch, weight=terms.weights[None], normalize=True)[0] - base
    res = METHODS["linear"].merge(terms, MergeOptions(normalize=True), None)
    torch.testing.assert_close(res.B @ res.A, expected, atol=1e-5, rtol=1e-5)


def test_sce_equals_mergekit_sce():
    terms = _terms()
    terms.weights = torch.ones(3)  # mergekit's SCE takes no weights
    expected = _mergekit(registry.get("sce"), terms, {"select_topk": 0.5})
    got = METHODS["sce"].merge(terms, MergeOptions(select_topk=0.5), None).delta
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dare_paper_rescale_is_one_over_density():
    """DARE paper Eq. 2 / PEFT merge_utils.random_pruning: kept entries divided by the keep probability."""
    terms = _terms(n=1)
    o = MergeOptions(density=0.3, seed=1)
    got = METHODS["dare_linear"].merge(terms, o, torch.Generator().manual_seed(1)).delta
    torch.manual_seed(1)
    mask = torch.bernoulli(torch.full((1, 24, 20), 0.3))[0]
    torch.testing.assert_close(got, terms.task_vectors()[0] * mask / 0.3 * terms.weights[0])


# ---- PEFT add_weighted_adapter ---------------------------------------------------------------------------
def _peft_weighted(paths, weights, combination, **kw):
    model = PeftModel.from_pretrained(tiny_llama(), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(paths))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kw)
    model.set_adapter("merged")
    return model


def _peft_delta(model, name="merged"):
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    return layer.get_delta_weight(name)


def test_cat_and_svd_equal_peft_for_plain_lora(tmp_path):
    paths = [make_adapter(tiny_llama, tmp_path / f"s{i}", i, r=r, lora_alpha=2 * r) for i, r in enumerate((4, 6))]
    weights = [0.8, -0.5]
    for combination, kw in (("cat", {}), ("svd", {"svd_rank": 5})):
        ours = merge_adapters(paths, weights, combination, model=tiny_llama(), **kw).save(tmp_path / combination)
        theirs = _peft_delta(_peft_weighted(paths, weights, combination, **kw))
        mine = _peft_delta(PeftModel.from_pretrained(tiny_llama(), str(ours)), "default")
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", [dict(r=4, lora_alpha=8, use_rslora=True), dict(r=4, lora_alpha=8, lora_bias=True),
                                     dict(r=4, lora_alpha=8, use_dora=True)], ids=["rslora", "lora_bias", "dora"])
def test_peft_add_weighted_adapter_is_wrong_where_lorakit_is_right(variant, ids, tmp_path):
    src = make_adapter(tiny_llama, tmp_path / "src", 0, **variant)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), str(src))(input_ids=ids).logits
        peft_merged = _peft_weighted([src], [1.0], "cat")(input_ids=ids).logits
        ours = merge_adapters([src], [1.0], "cat", model=tiny_llama()).save(tmp_path / "ours")
        lorakit_merged = PeftModel.from_pretrained(tiny_llama(), str(ours))(input_ids=ids).logits
    assert (peft_merged - expected).abs().max() > 1e-2  # PEFT: one adapter, weight 1, not reproduced
    torch.testing.assert_close(lorakit_merged, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("combination,weights,kw", [
    ("magnitude_prune_svd", [0.8, -0.5], {"density": 0.4}),
    ("ties_svd", [1.0, 1.0], {"density": 0.4}),  # unit weights: PEFT's and mergekit's TIES agree (methods.py)
])
def test_dense_svd_forms_equal_peft(combination, weights, kw, tmp_path):
    """PEFT's ``_svd_generalized_task_arithmetic_weighted_adapter`` (peft/tuners/lora/model.py): each source's
    ``get_delta_weight`` (scaling included), ``magnitude_prune`` / ``ties`` of peft/utils/merge_utils.py on them,
    then ``torch.linalg.svd`` truncated to ``svd_rank`` (B = U_k S_k, A = Vh_k)."""
    paths = [make_adapter(tiny_llama, tmp_path / f"s{i}", i, r=r, lora_alpha=2 * r) for i, r in enumerate((4, 6))]
    ours = merge_adapters(paths, weights, combination, model=tiny_llama(), svd_rank=5, **kw).save(tmp_path / "ours")
    theirs = _peft_delta(_peft_weighted(paths, weights, combination, svd_rank=5, **kw))
    mine = _peft_delta(PeftModel.from_pretrained(tiny_llama(), str(ours)), "default")
    assert theirs.abs().max() > 0
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
