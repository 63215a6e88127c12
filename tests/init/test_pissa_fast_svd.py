"""PiSSA with the fast randomised SVD (``init_lora_weights="pissa_niter_K"``, lorakit/init/weight_split.py) against
the installed ``peft`` (peft/tuners/lora/layer.py ``pissa_init``: ``svd_lowrank(W, r, niter=K)``, ``S /= s``,
``A = diag(√S) Uᵀ``, ``B = V diag(√S)``, ``W -= s·B A``), with ``svd_lowrank`` reseeded before every call so
both libraries draw the same random projection; and the saved file for the original base loaded into an untouched
base in PEFT."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import lorakit as lk
from lorakit.core.inits import get_init

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("niter", ["0", "2", "04"])  # "04": PEFT reads K with int() (layer.py pissa_init)
def test_pissa_niter_matches_peft_and_converts_for_the_original_base(niter, seeded_svd, ids, tmp_path):
    init = f"pissa_niter_{niter}"
    ours = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights=init))
    ours_sd, ref_sd = lk.adapter_state_dict(ours), peft.get_peft_model_state_dict(ref)
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-5, rtol=1e-5)
    ref_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in ref.named_parameters()
                if "lora_" not in n}
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, ref_base[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    with torch.no_grad():
        for n, p in ours.named_parameters():  # stand-in for training
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
        want = ours(input_ids=ids).logits
    lk.save_adapter(ours, tmp_path / "orig", original_base=True)
    with torch.no_grad():
        untouched = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "orig")
        torch.testing.assert_close(untouched(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def _peft_pissa_file(init, ids, path):
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights=init))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in ref.named_parameters():  # stand-in for training
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        want = ref(input_ids=ids).logits
    ref.save_pretrained(path)
    return want


def test_a_randomised_pissa_file_warns_on_load_that_its_base_is_redrawn(ids, tmp_path):
    """A file with init_lora_weights="pissa_niter_K" holds A, B for the residual base a randomised SVD left. PEFT
    redoes that SVD when it loads the file (peft/tuners/lora/layer.py ``pissa_init``: ``svd_lowrank`` draws a random
    projection), so its own reload depends on the RNG state; lorakit did the same without a word. It now warns,
    naming the setting and the exact route (the file for the original base)."""
    want = _peft_pissa_file("pissa_niter_2", ids, tmp_path / "p")
    base = tiny_llama()
    torch.manual_seed(1)  # another RNG state than the saving run's
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(base, tmp_path / "p")(input_ids=ids).logits
    assert (again - want).abs().max() > 1e-3  # the reference itself does not reproduce its file
    with pytest.warns(UserWarning, match=r"init_lora_weights='pissa_niter_2' is redone on load with a new random "
                                         r"SVD.*original_base=True"):
        lk.load_adapter(tiny_llama(), tmp_path / "p")


def test_an_exact_pissa_file_loads_without_the_warning(ids, tmp_path):
    want = _peft_pissa_file("pissa", ids, tmp_path / "p")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*redone on load")
        model = lk.load_adapter(tiny_llama(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["pissa_niter4", "pissa_niter_", "pissa-niter-4", "pissa_niter_x"])
def test_a_misspelt_pissa_niter_lists_the_form_it_takes(spec):
    # PEFT's pissa_init (peft/tuners/lora/layer.py) refuses these too: no "_niter_" split or int() fails
    with pytest.raises((ValueError, KeyError)):
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=spec))
    with pytest.raises(lk.ConfigError, match=r"pissa / pissa_niter_K \(K >= 0 digits, e\.g\. pissa_niter_4\)"):
        lk.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=spec)
    with pytest.raises(lk.ConfigError, match=r"Registered inits: .*pissa / pissa_niter_K"):
        get_init(spec)  # what `lorakit train --init NAME` checks first
