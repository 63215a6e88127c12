"""The Python API called the wrong way: a clear lorakit error before anything changes, or what the call means.

Expected outputs come from the model itself, never from lorakit's own arithmetic: the base model's logits (no
adapter) and each adapter's logits with it as the only active, unmerged adapter. LoRA adds ``s·B·A·x`` once per
active adapter (Hu et al., arXiv:2106.09685, eq. 3), so naming an adapter twice must not add it twice.
"""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.model import merged_adapters
from lk_models import tiny_llama


def _cfg(r=4):
    return lk.LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def model():
    m = tiny_llama()
    lk.add_adapter(m, _cfg(), "math")
    lk.add_adapter(m, _cfg(2), "sql")
    lk.set_adapter(m, "math")
    return m


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_set_adapter_refuses_a_name_given_twice(model, ids):
    alone = _out(model, ids)
    with pytest.raises(lk.AdapterError, match=r"\['math'\] named more than once"):
        lk.set_adapter(model, ["math", "math"])  # before: both entries active, the update added twice
    assert lk.active_adapters(model) == ["math"]
    torch.testing.assert_close(_out(model, ids), alone, rtol=0, atol=0)


def test_merge_adapter_refuses_a_name_given_twice(model, ids):
    alone = _out(model, ids)
    with pytest.raises(lk.AdapterError, match="more than once"):
        lk.merge_adapter(model, ["math", "math"])  # before: merged twice into the weights
    assert merged_adapters(model) == []
    torch.testing.assert_close(_out(model, ids), alone, rtol=0, atol=0)


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_merge_takes_one_name_as_a_string(model, ids, call):
    math_alone = _out(model, ids)
    result = getattr(lk, call)(model, "math")  # before: the string's characters, "unknown adapter 'm'"
    out = _out(result if call == "merge_and_unload" else model, ids)
    torch.testing.assert_close(out, math_alone, rtol=1e-5, atol=1e-5)
    if call == "merge_adapter":
        assert merged_adapters(model) == ["math"]


@pytest.mark.parametrize("names", [None, 3, {"math"}, [None], ["math", 1]])
def test_set_adapter_names_of_a_wrong_type_are_a_lorakit_error(model, names):
    with pytest.raises(lk.AdapterError, match=r"set_adapter.*Loaded: \['math', 'sql'\]"):
        lk.set_adapter(model, names)  # before: a bare TypeError ("'int' object is not iterable") or a KeyError
    assert lk.active_adapters(model) == ["math"]


def test_unknown_names_list_near_matches_in_every_call(model):
    for call in (lambda: lk.set_adapter(model, "mth"), lambda: lk.merge_adapter(model, ["mth"]),
                 lambda: lk.merge_and_unload(model, ["mth"]), lambda: lk.delete_adapter(model, "mth")):
        with pytest.raises(lk.UnknownAdapterError, match=r"Did you mean: math\? Loaded: \['math', 'sql'\]"):
            call()
    assert lk.adapter_names(model) == ["math", "sql"] and merged_adapters(model) == []


def test_add_adapter_with_a_dict_config_says_how_to_make_one():
    m = tiny_llama()
    with pytest.raises(lk.ConfigError, match=r"AdapterConfig.*dict.*LoraConfig\(\*\*fields\)"):
        lk.add_adapter(m, {"r": 4})  # before: AttributeError 'dict' object has no attribute 'requested_init'
    assert lk.adapter_names(m) == []
