"""A delta declares which of its parameters train (``Delta.frozen_names``); the core honours it everywhere."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers, adapter_parameters
from lorakit.methods.lora import LoraLinear

from lk_models import tiny_llama


@pytest.fixture
def freeze_a(monkeypatch):
    """LoRA with A frozen (FFA-LoRA's split), switchable per test through ``state["names"]``."""
    state = {"names": ("lora_A.weight",)}
    monkeypatch.setattr(LoraLinear, "frozen_names", lambda self: state["names"])
    return state


def _requires_grad(model):
    return {n.split(".adapters.default.")[1] for n, p in model.named_parameters() if p.requires_grad}


def test_set_adapter_honours_frozen_names(freeze_a):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    assert _requires_grad(model) == {"lora_B.weight"}
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]), name="other")
    lk.set_adapter(model, ["default", "other"])
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_B"}
    trainable, total = lk.trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    assert set(adapter_parameters(model, "default", trainable_only=True)) == {
        n for n in adapter_parameters(model, "default") if "lora_B" in n}


def test_refresh_trainable_rereads_gradual_freezing(freeze_a):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"]))
    freeze_a["names"] = ("lora_A.weight", "lora_B.weight")
    assert _requires_grad(model) == {"lora_B.weight"}  # nothing changes until the core re-reads it
    lk.refresh_trainable(model)
    assert _requires_grad(model) == set()
    freeze_a["names"] = ()
    lk.refresh_trainable(model)
    assert _requires_grad(model) == {"lora_A.weight", "lora_B.weight"}


def test_frozen_parameters_are_saved_and_get_no_gradient(freeze_a, ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"lora_B"}
    lk.save_adapter(model, tmp_path / "a")
    keys = set(lk.adapter_state_dict(model))
    assert any(k.endswith("lora_A.weight") for k in keys)  # the file format still holds A
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "a", is_trainable=True)
    assert _requires_grad(fresh) == {"lora_B.weight"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_unknown_frozen_name_is_a_clear_error(freeze_a):
    freeze_a["names"] = ("lora_C.weight",)
    with pytest.raises(lk.AdapterError, match="lora_C.weight.*lora_A.weight"):
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))


def test_inactive_and_inference_adapters_never_train(freeze_a, tmp_path):
    freeze_a["names"] = ()
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]), name="b")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.b." in n)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    lk.refresh_trainable(loaded)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert [n for _, layer in adapter_layers(loaded) for n in layer.adapters] == ["default", "default"]
