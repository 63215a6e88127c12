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


def test_merge_inside_disable_adapters_is_refused(model, ids):
    """The block runs the base model: a merge inside it ran the adapter there (and the block's end quietly unmerged
    it again). PEFT unmerges at the block's first forward instead (peft/tuners/lora/layer.py ``Linear.forward``)."""
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    with lk.disable_adapters(model):
        with pytest.raises(lk.AdapterError, match="inside a disable_adapters block"):
            lk.merge_adapter(model)
        with pytest.raises(lk.AdapterError, match="inside a disable_adapters block"):
            lk.merge_and_unload(model)
        torch.testing.assert_close(_out(model, ids), base, rtol=0, atol=1e-6)
    assert merged_adapters(model) == [] and lk.adapter_names(model) == ["math", "sql"]
    lk.merge_adapter(model)  # after the block: fine
    assert merged_adapters(model) == ["math"]


def test_routing_adapter_names_as_one_string_is_refused(model, ids):
    with pytest.raises(TypeError, match=r"got the string 'math'; write adapter_names=\['math'\]"):
        with lk.routing(adapter_names="math"):  # before: its characters, "entry 'a' is not an adapter"
            _out(model, ids)
    with lk.routing(adapter_names=["math"]):  # one entry: every row's
        torch.testing.assert_close(_out(model, ids), _out(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("call", [lambda m: lk.add_adapter(m, _cfg()), lambda m: lk.set_adapter(m, "math"),
                                  lambda m: lk.disable_adapters(m).__enter__(), lambda m: lk.adapter_names(m)])
def test_a_model_name_given_as_the_model_says_to_load_it(call):
    with pytest.raises(lk.AdapterError, match=r"model must be a torch.nn.Module, got str \(load it first, e.g. "
                                              r"AutoModelForCausalLM.from_pretrained\('gpt2'\)\)"):
        call("gpt2")  # before: AttributeError: 'str' object has no attribute 'lorakit'


def test_a_rank_far_beyond_the_layers_is_refused_before_any_tensor_exists():
    """``r=100000`` on every linear layer got the process killed for memory with no message: an adapter of more than
    MAX_ADAPTER_TO_BASE (10) times the base's parameters is refused, naming the largest layer's shape and count.
    Expected counts from LoRA's shapes (Hu et al. 2021, arXiv:2106.09685: A is r x in, B is out x r)."""
    from lorakit.core.model import MAX_ADAPTER_TO_BASE

    model = tiny_llama()
    base = sum(p.numel() for p in model.parameters())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    per_rank = sum(m.in_features + m.out_features for m in linears.values())
    widest = max(linears.values(), key=lambda m: m.in_features + m.out_features)
    r = MAX_ADAPTER_TO_BASE * base // per_rank + 1  # the smallest rank over the limit
    with pytest.raises(lk.ConfigError, match=r"LoraConfig.r=") as e:
        lk.add_adapter(model, lk.LoraConfig(r=r, target_modules="all-linear"))
    text = str(e.value)
    assert f"{r * per_rank:,} adapter parameters" in text and f"base model's {base:,}" in text, text
    assert f"in_features={widest.in_features}, out_features={widest.out_features}" in text, text
    assert f"{r * (widest.in_features + widest.out_features):,}" in text and e.value.field == "LoraConfig.r"
    assert not lk.adapter_names(model)  # nothing attached
    lk.add_adapter(model, lk.LoraConfig(r=r - 1, target_modules="all-linear"))  # at the limit: r > min(in, out) is fine
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == (r - 1) * per_rank
