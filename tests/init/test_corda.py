"""CorDA (``lorakit/init/corda.py``) against the installed ``peft`` (peft/tuners/lora/corda.py ``preprocess_corda``
+ layer.py ``corda_init``) on the same batches (batch size 1, which PEFT's covariance hook assumes): same factors,
same residual base, and PEFT's conversion to a LoRA for the original base
(``save_pretrained(path_initial_model_for_weight_conversion=...)``), loaded into an untouched base in PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (1, 24), generator=g)} for _ in range(n)]


def _peft_corda(batches, method="ipm"):
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=method))
    preprocess_corda(model, config, run_model=lambda: [model(**b) for b in batches])
    return peft.get_peft_model(model, config)


def _ours(batches, method="ipm"):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lk.init_adapter(model, "default", batches, init="corda", corda_method=method)
    return model


def _base(model):
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
            for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_factors_and_residual_base_match_peft(method):
    batches = _batches()
    ours, ref = _ours(batches, method), _peft_corda(batches, method)
    ours_sd, ref_sd = lk.adapter_state_dict(ours), peft.get_peft_model_state_dict(ref)
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-5, rtol=1e-4)
    ours_base, ref_base = _base(ours), _base(ref)
    for k in ref_base:
        torch.testing.assert_close(ours_base[k], ref_base[k], atol=1e-6, rtol=0)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_corda_original_base_file_matches_peft_conversion_and_loads_on_an_untouched_base(tmp_path):
    batches = _batches()
    ours, ref = _ours(batches), _peft_corda(batches)
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter first
    ref.save_pretrained(tmp_path / "peft_init")
    ref.peft_config["default"].init_lora_weights = "corda"
    for model in (ours, ref):  # the same stand-in for training on both
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in sorted((n.replace(".default", "").replace(".adapters", ""), p)
                               for n, p in model.named_parameters() if "lora_" in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    lk.save_adapter(ours, tmp_path / "ours", original_base=True)
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    ours_t, ref_t = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_t.keys() == ref_t.keys()
    for k in ref_t:
        torch.testing.assert_close(ours_t[k], ref_t[k], atol=1e-5, rtol=1e-4)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        untouched = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        torch.testing.assert_close(untouched(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_corda_file_without_conversion_is_refused_on_load(tmp_path):
    ours = _ours(_batches())
    lk.save_adapter(ours, tmp_path / "a")
    with pytest.raises(lk.AdapterLoadError, match="original_base=True"):
        lk.load_adapter(tiny_llama(), tmp_path / "a")


def test_corda_restore_base_gives_the_original_weights_back():
    model = _ours(_batches())
    lk.restore_base(model, "default")
    original = _base(tiny_llama())
    for k, v in _base(model).items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
    assert {p for p, _ in adapter_layers(model)} == {p for p, _ in adapter_layers(_ours(_batches()))}
