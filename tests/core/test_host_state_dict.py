"""``model.save_pretrained()`` on a model with a lorakit adapter (issue 36, item 1).

PEFT 0.21.2's injected layers write ``q_proj.base_layer.weight`` and ``lora_A.default.weight`` there, and
``from_pretrained`` then re-initialises ``q_proj`` at random (checked with real PEFT below). lorakit's adapted
layers give the state dict the host's own names for the host's tensors, so the folder reloads as the base model
exactly, and a lorakit model still loads its whole state (adapter included) back."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from tests.lk_models import tiny_llama

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def adapted(**kwargs):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        init_lora_weights=False, **kwargs))
    return model, base


def test_peft_reference_reinitialises_wrapped_layers(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped.base_model.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, q)  # what lorakit must not do


def test_save_pretrained_reloads_the_base_exactly(tmp_path):
    model, base = adapted()
    assert set(base) <= set(model.state_dict())  # the host's keys, adapter keys besides
    with lk.disable_adapters(model), torch.no_grad():
        base_logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    state = reloaded.state_dict()
    assert state.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, base_logits, rtol=0, atol=0)


def test_merged_adapter_is_in_the_saved_base(tmp_path):
    model, _ = adapted()
    with torch.no_grad():
        adapted_logits = model(IDS).logits
    lk.merge_adapter(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_state_dict_loads_back_into_an_adapted_model_strictly():
    model, _ = adapted(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.5)
        expected = model(IDS).logits
    state = model.state_dict()
    assert "lm_head.weight" in state and "lm_head.copies.default.weight" in state
    assert not any(".base_layer." in k or ".original_module." in k for k in state)
    fresh, _ = adapted(modules_to_save=["lm_head"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=0)
    # the wrapped spelling (checkpoints written before) still loads
    old = {k.replace("q_proj.weight", "q_proj.base_layer.weight"): v for k, v in state.items()}
    fresh.load_state_dict(old, strict=True)


def test_adapted_model_still_pickles_and_copies():
    model, _ = adapted()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for other in (again, twin, pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(other(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert again.state_dict().keys() == model.state_dict().keys()
