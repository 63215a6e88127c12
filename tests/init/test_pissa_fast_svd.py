"""PiSSA with the fast randomised SVD (``init_lora_weights="pissa_niter_K"``, lorakit/init/weight_split.py) against
the installed ``peft`` (peft/tuners/lora/layer.py ``pissa_init``: ``svd_lowrank(W, r, niter=K)``, ``S /= s``,
``A = diag(√S) Uᵀ``, ``B = V diag(√S)``, ``W -= s·B A``), with ``svd_lowrank`` reseeded before every call so
both libraries draw the same random projection; and the saved file for the original base loaded into an untouched
base in PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit as lk

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("niter", [2, 4])
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
