"""Host code reads attributes of the layers it owns through lorakit's wrappers, as it does through PEFT's: an
adapted layer answers its base layer's ``weight`` / ``bias`` (peft/tuners/tuners_utils.py BaseTunerLayer.weight,
"required for some transformers code, e.g. T5"), a modules_to_save wrapper answers from the module it runs, the
active adapter's copy or the original (peft/utils/other.py ModulesToSaveWrapper.__getattr__)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit as lk
from lk_models import tiny_bert, tiny_gpt2, tiny_llama


def test_adapted_layer_answers_base_weight_and_bias_as_peft():
    model = lk.add_adapter(tiny_gpt2(), lk.LoraConfig(r=4, target_modules=["c_attn"]))
    peft_model = get_peft_model(tiny_gpt2(), PeftLoraConfig(r=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    peft_layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert torch.equal(layer.weight, peft_layer.weight) and torch.equal(layer.bias, peft_layer.bias)
    no_bias = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"])).model.layers[0].self_attn.q_proj
    assert no_bias.bias is None


def test_assigning_weight_on_adapted_layer_is_refused():
    layer = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"])).model.layers[0].self_attn.q_proj
    with pytest.raises(KeyError, match="already exists"):  # not a second, unused 'weight' beside the base layer's
        layer.weight = torch.nn.Parameter(torch.zeros(2, 2))
    assert "weight" not in dict(layer.named_parameters(recurse=False))


@pytest.mark.parametrize("head,factory", [("lm_head", tiny_llama), ("classifier", tiny_bert)])
def test_modules_to_save_wrapper_answers_from_the_module_it_runs(head, factory):
    model = lk.add_adapter(factory(), lk.LoraConfig(r=4, target_modules=["q_proj"] if head == "lm_head" else
                                                    ["query"], modules_to_save=[head]))
    peft_model = get_peft_model(factory(), PeftLoraConfig(r=4, target_modules=["q_proj"] if head == "lm_head" else
                                                          ["query"], modules_to_save=[head]))
    wrapper, peft_wrapper = getattr(model, head), getattr(peft_model.base_model.model, head)
    assert wrapper.weight is wrapper.copies["default"].weight  # the trained copy, as PEFT's
    assert peft_wrapper.weight is peft_wrapper.modules_to_save["default"].weight
    assert wrapper.out_features == peft_wrapper.out_features
    with lk.disable_adapters(model), peft_model.disable_adapter():
        assert wrapper.weight is wrapper.original_module.weight
        assert peft_wrapper.weight is peft_wrapper.original_module.weight
    with pytest.raises(AttributeError, match="no_such_attribute"):
        wrapper.no_such_attribute
