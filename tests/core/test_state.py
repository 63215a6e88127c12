"""Adapter state changes restore exactly what they found (issue 10, faults 1 and 3).

Right values are computed independently: the base model's output before any adapter was added, and each
adapter's output with it as the only adapter on a fresh copy of the base.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lk_models import tiny_llama


def _cfg(**kw):
    return lk.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **kw)


@pytest.fixture
def base_and_model(ids):
    base = tiny_llama()
    model = copy.deepcopy(base)
    lk.add_adapter(model, _cfg(r=4), "a")
    lk.add_adapter(model, _cfg(r=2, lora_alpha=16), "b")
    ALONE.clear()
    for name in ("a", "b"):  # each adapter as the only one on its own copy, never merged
        m = copy.deepcopy(model)
        lk.delete_adapter(m, "b" if name == "a" else "a")
        lk.set_adapter(m, name)
        ALONE[name] = _out(m, ids)
    return base, model


ALONE: dict[str, torch.Tensor] = {}


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _alone(base, name, ids):
    return ALONE[name]


def close(x, y, tol=1e-5):
    return (x - y).abs().max().item() <= tol


@pytest.mark.parametrize("merged", [False, True])
def test_nested_disable_restores_each_level(base_and_model, ids, merged):
    base, model = base_and_model
    y_base, y_a = _out(base, ids), _out(model, ids)
    assert not close(y_base, y_a)
    if merged:
        lk.merge_adapter(model)
    with lk.disable_adapters(model):
        with lk.disable_adapters(model):
            assert close(_out(model, ids), y_base)
        assert close(_out(model, ids), y_base)  # the inner exit leaves the outer block disabled
    assert close(_out(model, ids), y_a)
    assert lk.core.model.merged_adapters(model) == (["a"] if merged else [])


@pytest.mark.parametrize("merged", [False, True])
def test_disable_restores_state_after_exception(base_and_model, ids, merged):
    base, model = base_and_model
    y_a = _out(model, ids)
    if merged:
        lk.merge_adapter(model)
    with pytest.raises(RuntimeError, match="inside"):
        with lk.disable_adapters(model):
            with lk.disable_adapters(model):
                raise RuntimeError("inside")
    assert close(_out(model, ids), y_a)
    assert lk.core.model.merged_adapters(model) == (["a"] if merged else [])
    assert not any(layer.disabled for _, layer in lk.core.model.adapter_layers(model))


def test_layers_added_inside_disable_follow_the_block(ids):
    base = tiny_llama()
    model = copy.deepcopy(base)
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    lk.add_adapter(model, lk.LoraConfig(target_modules=["k_proj"], init_lora_weights=False), "k")
    lk.set_adapter(model, "k")
    y_k = _out(model, ids)
    lk.delete_adapter(model, "k")
    with lk.disable_adapters(model):
        torch.manual_seed(1)
        lk.add_adapter(model, lk.LoraConfig(target_modules=["k_proj"], init_lora_weights=False), "k2")
        lk.set_adapter(model, "k2")
        assert close(_out(model, ids), _out(base, ids))
    assert not close(_out(model, ids), _out(base, ids))
    assert y_k.shape == _out(model, ids).shape


# -- fault 3: every transition while an adapter is merged ------------------------------------------------------
def _merged_a(base_and_model):
    base, model = base_and_model
    lk.set_adapter(model, "a")
    lk.merge_adapter(model)
    return base, model


def test_set_adapter_while_merged_unmerges_with_warning(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    with pytest.warns(UserWarning, match="unmerging"):
        lk.set_adapter(model, "b")
    assert close(_out(model, ids), _alone(base, "b", ids))  # base + b, not base + a + b
    assert lk.core.model.merged_adapters(model) == []


def test_set_same_adapter_while_merged_keeps_it_merged(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    lk.set_adapter(model, "a")
    assert lk.core.model.merged_adapters(model) == ["a"]
    assert close(_out(model, ids), _alone(base, "a", ids))
    lk.set_adapter(model, ["b", "a"])  # a stays merged, b joins unmerged: base + a + b either way
    y_ab = _out(model, ids)
    lk.unmerge_adapter(model)
    assert close(y_ab, _out(model, ids))


def test_disable_enable_while_merged(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    with lk.disable_adapters(model):
        assert close(_out(model, ids), _out(base, ids))
    assert close(_out(model, ids), _alone(base, "a", ids))


def test_delete_merged_adapter_is_refused_and_other_deletes_keep_merge(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    with pytest.raises(lk.AdapterError, match="merged"):
        lk.delete_adapter(model, "a")
    lk.delete_adapter(model, "b")
    assert close(_out(model, ids), _alone(base, "a", ids))
    lk.unmerge_adapter(model)
    lk.delete_adapter(model, "a")
    assert close(_out(model, ids), _out(base, ids))


def test_add_and_load_while_merged_build_on_the_base(base_and_model, ids, tmp_path):
    base, model = _merged_a(base_and_model)
    # DoRA's magnitude is initialised from the base weight's norms: it must not see base + a.
    lk.add_adapter(model, _cfg(r=4, use_dora=True), "d")
    assert close(_out(model, ids), _alone(base, "a", ids))  # adding leaves the function alone
    lk.save_adapter(model, tmp_path / "d", "d")
    lk.load_adapter(model, tmp_path / "d", "d2")
    assert lk.core.model.merged_adapters(model) == ["a"]
    assert close(_out(model, ids), _alone(base, "a", ids))
    with pytest.warns(UserWarning, match="unmerging"):
        lk.set_adapter(model, "d2")
    ref = copy.deepcopy(base)
    lk.load_adapter(ref, tmp_path / "d", "d2")
    assert close(_out(model, ids), _out(ref, ids))
    # DoRA (arXiv:2402.09353 eq. 2; PEFT lora/dora.py get_weight_norm): m = ||W0 + s·B A|| per output row, W0 the base.
    sd = lk.adapter_state_dict(model, "d")
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    w0 = base.model.layers[0].self_attn.q_proj.weight
    expected = (w0 + (8 / 4) * sd[key + "lora_B.weight"] @ sd[key + "lora_A.weight"]).norm(dim=1)
    assert torch.allclose(sd[key + "lora_magnitude_vector"], expected, atol=1e-6)


def test_merge_then_merge_and_unload_other(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    with pytest.warns(UserWarning, match="unmerging"):
        lk.set_adapter(model, "b")
    plain = lk.merge_and_unload(model)
    assert close(_out(plain, ids), _alone(base, "b", ids))


def test_refused_merge_changes_nothing(ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                         attention_bias=True)).eval()  # q_proj has a bias, down_proj has none
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "down_proj"], lora_bias=True,
                                        init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = _out(model, ids)
    with pytest.raises(lk.AdapterError, match="has a bias but the base layer has none"):
        lk.merge_adapter(model)
    assert lk.core.model.merged_adapters(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert close(_out(model, ids), y)


def test_mixed_batches_refused_while_merged(base_and_model, ids):
    from lorakit import serving

    base, model = base_and_model
    serving.bank_adapters(model)
    lk.merge_adapter(model)
    with serving.bank_routing(model, ["b", None, "a"]), pytest.raises(lk.AdapterError, match="merged"):
        _out(model, ids)
    with lk.routing(adapter_names=["b", None, "a"]), pytest.raises(lk.AdapterError, match="merged"):
        _out(model, ids)
    lk.unmerge_adapter(model)
    with serving.bank_routing(model, ["b", None, "a"]):
        y = _out(model, ids)
    assert close(y[:1], ALONE["b"][:1]) and close(y[1:2], _out(base, ids)[1:2]) and close(y[2:], ALONE["a"][2:])


def test_merge_and_unload_of_another_adapter_while_merged(base_and_model, ids):
    base, model = _merged_a(base_and_model)
    with pytest.warns(UserWarning, match="unmerging them first"):
        plain = lk.merge_and_unload(model, ["b"])
    assert close(_out(plain, ids), ALONE["b"])


def test_adapter_name_that_is_a_module_attribute_is_refused_before_anything_changes():
    """Adapter names key an nn.ModuleDict in every layer: 'eval', 'train', 'keys'... would be a bare KeyError from
    torch halfway through attaching; they are refused up front, naming the problem."""
    model = tiny_llama()
    for bad in ("eval", "train", "keys", "training", "_private"):
        with pytest.raises(lk.AdapterError, match="attribute"):
            lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), name=bad)
    assert not list(lk.core.model.adapter_layers(model))
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), name="eval_adapter")


def _wrapped_state(model):
    """Every lorakit wrapper's (path, type, active) and every parameter's requires_grad, by name."""
    from lorakit.core.layer import AdapterLayer, ModulesToSaveWrapper

    wrappers = [(n, type(m).__name__, list(m.active)) for n, m in model.named_modules()
                if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    return wrappers, {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("deleted, kept_active", [("a", ["b"]), ("b", ["a", "c"])])
def test_delete_leaves_the_state_that_adding_the_survivors_alone_gives(ids, deleted, kept_active):
    """Deleting one of three adapters with different targets and modules_to_save: the wrappers left, their active
    lists, every parameter's requires_grad and the logits equal those of a fresh base given only the survivors
    (same seeds), activated the same way. (delete_adapter hands its one walk of the model to the activation.)"""
    specs = {"a": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
             "b": dict(target_modules=["v_proj", "down_proj"]),
             "c": dict(target_modules=["o_proj"], inference_mode=True)}

    def build(names):
        model = tiny_llama()
        for name in names:
            torch.manual_seed(ord(name))
            lk.add_adapter(model, lk.LoraConfig(r=2, init_lora_weights=False, **specs[name]), name)
        return model

    model = build("abc")
    lk.set_adapter(model, [n for n in "abc" if n != "b"] if deleted == "b" else ["a", "b"])
    lk.delete_adapter(model, deleted)
    survivors = build([n for n in "abc" if n != deleted])
    lk.set_adapter(survivors, kept_active)
    assert lk.core.model.adapter_state(model).active == kept_active
    assert _wrapped_state(model) == _wrapped_state(survivors)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, survivors(input_ids=ids).logits)
