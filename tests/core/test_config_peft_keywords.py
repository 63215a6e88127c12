"""Configs take PEFT's keyword arguments as PEFT's docs write them (``bias="none"``, ``task_type``,
``fan_in_fan_out``): a new user's first ``LoraConfig(...)`` raised TypeError. The reference is the real ``peft``
package: the same keywords build an adapter with the same trainable tensors and outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict

import lorakit as lk
from lk_models import tiny_bert, tiny_gpt2, tiny_llama

# the config of PEFT's quicktour / LoRA guide, fan_in_fan_out as GPT-2's Conv1D needs it in PEFT
PEFT_SNIPPETS = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                               bias="none", task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="none",
                             task_type="CAUSAL_LM")),
    "bert": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                             modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(PEFT_SNIPPETS))
def test_peft_keywords_build_the_adapter_peft_builds(case, ids):
    factory, kwargs = PEFT_SNIPPETS[case]
    # (PEFT's SEQ_CLS model extends the config's modules_to_save list in place: each library gets its own copy)
    peft_model = get_peft_model(factory(), PeftLoraConfig(**copy.deepcopy(kwargs), init_lora_weights=False)).eval()
    model = lk.add_adapter(factory(), lk.LoraConfig(**copy.deepcopy(kwargs), init_lora_weights=False)).eval()
    want = get_peft_model_state_dict(peft_model)
    got = lk.adapter_state_dict(model)
    assert sorted(got) == sorted(want)
    with torch.no_grad():
        for key, value in want.items():
            got[key].copy_(value)  # PEFT's (random) factors and head copy into lorakit's
        assert torch.allclose(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias="all"), r"'bias'='all' asks for a feature"),
    (dict(bias="lora_only"), r"'bias'='lora_only' asks for a feature"),
    (dict(lora_alpah=16), r"unknown field 'lora_alpah'.*Did you mean: lora_alpha"),
    (dict(task_type="SEQ_CLS"), r"modules_to_save=\['classifier'\]"),
    (dict(task_type="QUESTION_ANS"), r"modules_to_save=\['qa_outputs'\]"),
])
def test_peft_keywords_lorakit_cannot_honour_raise_config_error(kwargs, match):
    with pytest.raises(lk.ConfigError, match=match):
        lk.LoraConfig(**kwargs)


def test_other_methods_take_the_peft_keywords_they_declare():
    from lorakit.methods.miss import MissConfig

    assert MissConfig(r=4, bias="none", task_type="CAUSAL_LM").r == 4
    with pytest.raises(lk.ConfigError, match="unknown field 'rr'"):
        MissConfig(rr=4)
