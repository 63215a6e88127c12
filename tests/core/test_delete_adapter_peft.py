"""delete_adapter picks the adapters left active as PEFT does, checked against the installed ``peft`` on the same
calls (peft/tuners/tuners_utils.py ``BaseTunerLayer.delete_adapter``: the deleted adapter leaves the active list;
where none is left active, the first of the remaining adapters by sorted name is activated, with a warning;
``BaseTuner.delete_adapter`` takes the layers' new active list as the model's).

Was: deleting the only active adapter left none active while others were loaded."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

import lorakit as lk
from lk_models import tiny_llama

NAMES = ("default", "zeta", "beta")  # added in this order; sorted, "beta" comes first


def _pair(tmp_path):
    """The same three LoRA adapters on a lorakit model and on a PEFT model (each saved by lorakit, loaded by peft)."""
    ours = tiny_llama()
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        lk.add_adapter(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False), name)
        lk.save_adapter(ours, tmp_path / name, name)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    return ours, theirs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _active(ours, theirs):
    return lk.core.model.adapter_state(ours).active, list(theirs.base_model.active_adapters)


def test_deleting_the_only_active_adapter_activates_the_first_remaining_by_name_as_peft(tmp_path):
    ours, theirs = _pair(tmp_path)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    assert _active(ours, theirs) == (["default"], ["default"])

    with pytest.warns(UserWarning, match="Adapter default was active"):
        theirs.delete_adapter("default")
    with pytest.warns(UserWarning, match=r"adapter 'default' was active.*now 'beta'"):
        lk.delete_adapter(ours, "default")
    assert _active(ours, theirs) == (["beta"], ["beta"])
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids))

    theirs.base_model.set_adapter(["zeta", "beta"])
    lk.set_adapter(ours, ["zeta", "beta"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another adapter stays active: nothing to warn about
        theirs.delete_adapter("zeta")
        lk.delete_adapter(ours, "zeta")
    assert _active(ours, theirs) == (["beta"], ["beta"])
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids))

    theirs.delete_adapter("beta")
    lk.delete_adapter(ours, "beta")  # the last one: nothing left to activate
    assert _active(ours, theirs) == ([], [])
    # PeftModel's own forward needs an adapter config; its base model computes what is left
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs.base_model.model, ids))
    torch.testing.assert_close(_logits(ours, ids), _logits(tiny_llama(), ids))


def test_deleting_an_inactive_adapter_keeps_the_active_one_as_peft(tmp_path):
    ours, theirs = _pair(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs.delete_adapter("beta")
        lk.delete_adapter(ours, "beta")
    assert _active(ours, theirs) == (["default"], ["default"])


def test_a_failed_add_adapter_activates_no_other_adapter():
    """add_adapter is all or nothing: an init that fails after attaching (EVA on token ids beyond the vocabulary)
    leaves the adapters and the active set as they were. Was: its rollback deleted the new adapter, active as the
    first added on a model with none active, and delete_adapter then activated 'mine' in its place."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["v_proj"]), "mine")
    lk.set_adapter(model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nor a warning about an adapter activated)
        with pytest.raises(IndexError):
            lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "new", init="eva",
                           init_batches=[{"input_ids": torch.tensor([[10 ** 6]])}])
    state = lk.core.model.adapter_state(model)
    assert list(state.configs) == ["mine"] and state.active == []
