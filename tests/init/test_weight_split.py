"""PiSSA and OLoRA inits (``lorakit/init/weight_split.py``) against real PEFT: same factors, same residual base,
same files, and PEFT's conversion for the original base (``path_initial_model_for_weight_conversion``).

Reference: peft/tuners/lora/layer.py ``LoraLayer.pissa_init`` / ``olora_init`` and peft/peft_model.py
``PeftModel.save_pretrained(path_initial_model_for_weight_conversion=...)``, run here as the installed package.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.inits import base_edits
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lk(init, **kw):
    return lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=init, **kw))


def _peft(init, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kw)
    return peft.get_peft_model(tiny_llama(), config)


def _train_like(model_params, seed=0):
    """Stand-in for training: move every LoRA factor by the same seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model_params):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_params(model):
    return [(n.replace(".default", "").replace(".adapters", ""), p) for n, p in model.named_parameters()
            if "lora_" in n]


def _base_weights(model):
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_factors_and_residual_base_match_peft(init, rslora, ids):
    ours, ref = _lk(init, use_rslora=rslora), _peft(init, use_rslora=rslora)
    ours_sd = {k.replace("base_model.model.", ""): v for k, v in lk.adapter_state_dict(ours).items()}
    ref_sd = {k.replace("base_model.model.", ""): v for k, v in peft.get_peft_model_state_dict(ref).items()}
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-5, rtol=1e-5)
    ours_base, ref_base = _base_weights(ours), _base_weights(ref)
    for k in ref_base:
        torch.testing.assert_close(ours_base[k], ref_base[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(ours_base[k], _base_weights(tiny_llama())[k]) for k in ref_base)  # base did change
    with torch.no_grad():  # W_res + s·B A = W: the fresh adapter equals the base model
        torch.testing.assert_close(ours(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_trained_file_loads_across_lorakit_and_peft(tmp_path, ids):
    ours, ref = _lk("pissa"), _peft("pissa")
    _train_like(_lora_params(ours))
    _train_like(_lora_params(ref))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        torch.testing.assert_close(ref(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    lk.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ref.save_pretrained(tmp_path / "peft")
    # Either file on an untouched base: the loader redoes PiSSA's split, then loads the trained factors.
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    in_lk = lk.load_adapter(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(in_lk(input_ids=ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_original_base_file_matches_peft_conversion(init, tmp_path, ids):
    ours, ref = _lk(init), _peft(init)
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter first
    ref.save_pretrained(tmp_path / "peft_init")
    ref.peft_config["default"].init_lora_weights = init
    _train_like(_lora_params(ours))
    _train_like(_lora_params(ref))
    lk.save_adapter(ours, tmp_path / "ours", original_base=True)
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))

    ours_t = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_t.keys() == ref_t.keys()
    for k in ref_t:
        torch.testing.assert_close(ours_t[k], ref_t[k], atol=1e-5, rtol=1e-5)
    ours_c = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert ours_c[key] == ref_c[key], key

    with torch.no_grad():
        want = ours(input_ids=ids).logits
        untouched = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")  # original base, in PEFT
        torch.testing.assert_close(untouched(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lk.load_adapter(tiny_llama(), tmp_path / "ours")(input_ids=ids).logits, want,
                                   atol=1e-5, rtol=0)


def test_restore_base_delete_and_unload_give_the_original_weights_back():
    original = _base_weights(tiny_llama())
    for undo in (lambda m: lk.restore_base(m, "default"), lambda m: lk.delete_adapter(m, "default"), lk.unload):
        model = _lk("pissa")
        undo(model)
        now = _base_weights(model)
        for k, v in original.items():
            torch.testing.assert_close(now[k], v, atol=1e-6, rtol=0)


def test_init_adapter_call_and_add_adapter_argument(ids):
    called = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    record = lk.init_adapter(called, "default", init="olora")
    assert record.init == "olora" and set(record.edits) == {p for p, _ in adapter_layers(called)}
    by_arg = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), init="olora")
    by_field = _lk("olora")
    for model in (called, by_arg):
        assert lk.adapter_state_dict(model).keys() == lk.adapter_state_dict(by_field).keys()
        for k, v in lk.adapter_state_dict(by_field).items():
            torch.testing.assert_close(lk.adapter_state_dict(model)[k], v)
        assert model.lorakit.configs["default"].init_lora_weights == "olora"  # the file will say so
    lk.init_adapter(called, "default")  # again: restores the base first, so the same split comes out
    for k, v in lk.adapter_state_dict(by_field).items():
        torch.testing.assert_close(lk.adapter_state_dict(called)[k], v, atol=1e-6, rtol=0)


def test_merge_and_unload_keeps_the_trained_weights(ids):
    model = _lk("pissa")
    _train_like(_lora_params(model))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(lk.merge_and_unload(model)(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_bad_init_names_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="Did you mean: pissa"):
        lk.LoraConfig(init_lora_weights="pisa")
    assert lk.LoraConfig(init_lora_weights="pissa_niter_4").requested_init() == "pissa_niter_4"
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=TARGETS))
    with pytest.raises(lk.ConfigError, match="unknown init 'olra'"):
        lk.init_adapter(model, "default", init="olra")
    with pytest.raises(lk.AdapterError, match="names no init"):
        lk.init_adapter(model, "default")
    with pytest.raises(lk.AdapterError, match="unknown adapter 'defualt'"):
        lk.init_adapter(model, "defualt", init="pissa")


def test_pissa_on_gpt2_conv1d_edits_the_stored_in_out_weight_in_place_and_restores_it():
    """GPT-2's Conv1D stores W as (in, out) (fan_in_fan_out): the residual must still be W − s·B A in (out, in)
    orientation (PiSSA's equation, arXiv:2404.02948 §3), edited in place, and restore_base must undo it."""
    from lk_models import tiny_gpt2

    original = {n: p.detach().clone() for n, p in tiny_gpt2().named_parameters()}
    model = lk.add_adapter(tiny_gpt2(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                      init_lora_weights="pissa"))
    edits = base_edits(model, "default")
    layers = dict(adapter_layers(model))
    for path, edit in edits.items():
        stored = layers[path].base_layer.weight  # (in, out)
        d = layers[path].adapters["default"]
        want = original[path + ".weight"].T - edit.scaling * d.lora_B.weight @ d.lora_A.weight  # (out, in)
        torch.testing.assert_close(stored.T, want, atol=1e-5, rtol=0)
        assert edit.A.untyped_storage().nbytes() == edit.A.numel() * 4  # the record holds r × in, nothing more
    lk.restore_base(model, "default")
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        if "lora_" not in n and key in original:
            torch.testing.assert_close(p, original[key], atol=1e-5, rtol=0)


def test_pissa_on_a_bfloat16_base_rounds_the_residual_as_peft_does():
    """A half-precision base: the residual is computed in float32 and rounded back (PEFT's ``pissa_init``)."""
    ours = lk.add_adapter(tiny_llama(dtype=torch.bfloat16),
                          lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    ref = peft.get_peft_model(tiny_llama(dtype=torch.bfloat16),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    ours_base, ref_base = _base_weights(ours), _base_weights(ref)
    for k in ref_base:
        assert ours_base[k].dtype == torch.bfloat16
        torch.testing.assert_close(ours_base[k].float(), ref_base[k].float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_records_are_taken_after_the_last_module_and_survive_training(init, monkeypatch):
    """Memory: no module's record is alive while a later module is factorised (the records would add to the
    last SVD's peak), yet each record is its own float32 copy of the initial factors, so training the adapter
    in place leaves it intact and restore_base still gives the original weights back."""
    import weakref

    from lorakit.init import _common, weight_split

    records: list[weakref.ref] = []

    class Counted(_common.BaseEdit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            records.append(weakref.ref(self))

    alive = []
    factorise = {"pissa": weight_split.pissa_factors, "olora": weight_split.olora_factors}[init]

    def counting(weight, r, scaling, *args):
        alive.append(sum(ref() is not None for ref in records))
        return factorise(weight, r, scaling, *args)

    monkeypatch.setattr(_common, "BaseEdit", Counted)
    monkeypatch.setattr(weight_split, f"{init}_factors", counting)
    original = _base_weights(tiny_llama())
    model = _lk(init)
    assert alive == [0] * len(base_edits(model, "default")) and len(records) == len(alive)
    layers = dict(adapter_layers(model))
    for path, edit in base_edits(model, "default").items():
        d = layers[path].adapters["default"]
        assert edit.A.data_ptr() != d.lora_A.weight.data_ptr() and edit.B.data_ptr() != d.lora_B.weight.data_ptr()
        assert torch.equal(edit.A, d.lora_A.weight) and torch.equal(edit.B, -d.lora_B.weight)
    _train_like(_lora_params(model))
    lk.restore_base(model, "default")
    for k, v in original.items():
        torch.testing.assert_close(_base_weights(model)[k], v, atol=1e-6, rtol=0)


def test_a_bfloat16_adapter_keeps_the_float32_factors_as_its_record():
    """An adapter in bfloat16 cannot hold the float32 factors exactly: the record keeps them (the base edit used
    them), not the adapter's rounded copy, so restore_base undoes exactly what was subtracted."""
    model = lk.add_adapter(tiny_llama(dtype=torch.bfloat16), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                           autocast_adapter_dtype=False)
    original = _base_weights(model)
    lk.init_adapter(model, "default", init="pissa")
    layers = dict(adapter_layers(model))
    for path, edit in base_edits(model, "default").items():
        d = layers[path].adapters["default"]
        assert edit.A.dtype == torch.float32 and d.lora_A.weight.dtype == torch.bfloat16
        assert not torch.equal(edit.A, d.lora_A.weight.float())  # the float32 factor, not the rounded one
        torch.testing.assert_close(edit.A.to(torch.bfloat16), d.lora_A.weight, atol=0, rtol=0)
    lk.restore_base(model, "default")
    for k, v in original.items():
        torch.testing.assert_close(_base_weights(model)[k].float(), v.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_nan_base_weight_names_the_module_and_leaves_the_model(init):
    """Every module is checked before any is split: a NaN in a later module's weight is an AdapterError naming
    it, and the earlier modules' weights and the adapter are untouched (before: the SVD failed half-way)."""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lk.AdapterError, match=r"base weight of module 'model.layers.1.mlp.down_proj' has NaN"):
        lk.init_adapter(model, "default", init=init)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], atol=0, rtol=0, equal_nan=True)
    assert "default" not in model.lorakit.inits


def test_a_dora_adapter_is_not_rewritten_for_the_original_base_as_peft_would(tmp_path, ids):
    """PEFT's conversion (peft/tuners/lora/model.py ``subtract_mutated_init``) rewrites only lora_A/lora_B as
    [A | A0], [B | -B0] and keeps DoRA's magnitude, which was taken from the *changed* base: on the untouched base
    its file does not give the trained model. lorakit refuses the export instead, saying why, and saves nothing."""
    ref = _peft("pissa", use_dora=True)
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter first
    ref.save_pretrained(tmp_path / "peft_init")
    ref.peft_config["default"].init_lora_weights = "pissa"
    _train_like(_lora_params(ref))
    with torch.no_grad():
        trained = ref(input_ids=ids).logits
    ref.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=tmp_path / "peft_init")
    converted = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft_lora")
    with torch.no_grad():
        gap = (converted(input_ids=ids).logits - trained).abs().max().item()
    assert gap > 1e-3, gap  # PEFT's converted DoRA file is not the trained model

    ours = _lk("pissa", use_dora=True)
    _train_like(_lora_params(ours))
    with pytest.raises(lk.AdapterError, match="magnitude is relative to the changed base"):
        lk.save_adapter(ours, tmp_path / "ours", original_base=True)
    assert not (tmp_path / "ours").exists()
