"""Loading an adapter into a model on the meta device (issue 36, item 2).

Copying a file's tensor into a meta tensor is a no-op: the adapter stayed on meta (PEFT 0.21.2 does the same,
with or without ``low_cpu_mem_usage``, checked below). lorakit refuses it, before the model is touched."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit as lk
from tests.lk_models import materialised_llama, meta_llama, save_llama_lora

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture
def saved(tmp_path):
    return tmp_path / "a", save_llama_lora(tmp_path / "a", IDS)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peft_reference_leaves_the_adapter_on_meta(saved, low_cpu_mem_usage):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(meta_llama(), str(saved[0]), low_cpu_mem_usage=low_cpu_mem_usage)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.is_meta


def test_load_into_a_meta_model_is_refused_and_leaves_it_untouched(saved):
    model = meta_llama()
    with pytest.raises(lk.AdapterLoadError, match=r"q_proj.*meta device.*Load the base weights first"):
        lk.load_adapter(model, saved[0])
    assert lk.adapter_names(model) == [] and not any("adapters" in n for n, _ in model.named_parameters())


def test_the_advised_path_loads_the_adapter(saved):
    directory, expected = saved
    model = materialised_llama()
    lk.load_adapter(model, directory)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fails_on", ["meta", "both"])
def test_an_error_inside_a_methods_build_surfaces_and_leaves_the_model_untouched(saved, monkeypatch, fails_on):
    """A loader sizes the deltas on the meta device first. An error a method's build raises there is a bug in the
    method: it reaches the caller (it used to be swallowed, the adapter then built for real before the checks,
    allocating whatever an edited config asked for), and the model is left as it was."""
    import dataclasses

    from lorakit.core import registry

    method = lk.get_method("lora")

    def broken_build(base, info, config, path):
        if fails_on == "both" or torch.empty(0).is_meta:  # the meta pass runs under torch.device("meta")
            raise IndexError(f"bug in the build of {path}")
        return method.build(base, info, config, path=path)

    monkeypatch.setitem(registry._METHODS, "lora", dataclasses.replace(method, build=broken_build))
    model = materialised_llama()
    with pytest.raises(IndexError, match=r"bug in the build of model\.layers\.0\.self_attn\.q_proj"):
        lk.load_adapter(model, saved[0])
    assert lk.adapter_names(model) == [] and not any("adapters" in n for n, _ in model.named_parameters())
