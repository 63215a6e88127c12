"""Serving adapters on a model on the meta device (issue 36, item 2, as tests/io/test_load_meta.py for load_adapter).

A bank is built on its base weight's device: on the meta device it would take none of the file's values (copying
into a meta tensor is a no-op), and the served model failed later or ran an empty adapter. load_adapters and
AdapterStore refuse it, as load_adapter does, before any bank or layer is touched."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.layer import AdapterLayer
from lorakit.serving import AdapterStore, bank_adapters, bank_routing, load_adapters, registry_of
from tests.lk_models import materialised_llama, meta_llama, save_llama_lora

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture
def saved(tmp_path):
    return tmp_path / "root" / "a", save_llama_lora(tmp_path / "root" / "a", IDS)


def _untouched(model) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_load_adapters_into_a_meta_model_is_refused_and_leaves_it_untouched(saved):
    model = meta_llama()
    with pytest.raises(lk.AdapterLoadError, match=r"q_proj.*meta device.*Load the base weights first"):
        load_adapters(model, {"a": saved[0]})
    assert _untouched(model)


def test_an_adapter_store_on_a_meta_model_refuses_the_adapter_and_says_why(saved):
    model = meta_llama()
    store = AdapterStore(model, [saved[0].parent])
    store.register("a", saved[0])
    with pytest.raises(lk.AdapterLoadError, match=r"meta device"):
        store.ensure_resident("a")
    assert "meta device" in store.failed["a"] and _untouched(model)


def test_the_advised_path_serves_the_adapter(saved):
    directory, expected = saved
    model = materialised_llama()
    load_adapters(model, {"a": directory})
    with torch.no_grad(), bank_routing(model, ["a"]):
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_banking_an_attached_adapter_on_a_meta_model_is_refused_and_leaves_it_unbanked():
    """Was: bank_adapters copied the meta adapter into meta banks and the first routed forward failed in torch
    ("Tensor.item() cannot be called on meta tensors"); now refused as load_adapters refuses, before any bank."""
    model = meta_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    with pytest.raises(lk.AdapterError, match=r"adapter 'a'.*q_proj.*meta device.*Load the base weights first.*"
                                              r"add the adapter and bank it"):
        bank_adapters(model)
    assert not any(isinstance(m, AdapterLayer) and m.bank is not None for m in model.modules())
    assert not registry_of(model).ids


def test_an_attached_adapter_on_the_materialised_model_banks_and_serves_as_attached():
    model = materialised_llama()
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    with torch.no_grad():
        expected = model(IDS).logits
    lk.set_adapter(model, [])
    bank_adapters(model)
    with torch.no_grad(), bank_routing(model, ["a"]):
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
