"""Saving and loading with a wrong path or a damaged file: a lorakit error naming the path or tensor, nothing
written or attached. Before: a bare FileExistsError / TypeError from pathlib, an int32 ``lora_A`` cast to float and
loaded without a word (PEFT's ``load_state_dict`` casts it too), and a key outside PEFT's layout named without its
file."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lk_models import tiny_llama


@pytest.fixture
def adapter(tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a"


def _rewrite(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(change(tensors), path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_an_integer_adapter_tensor_is_refused(adapter, dtype):
    _, folder = adapter
    _rewrite(folder, lambda t: {k: v.to(dtype) for k, v in t.items()})
    model = tiny_llama()
    with pytest.raises(lk.AdapterLoadError, match=rf"q_proj.lora_A.weight' has dtype {dtype}"):
        lk.load_adapter(model, folder)
    assert lk.adapter_names(model) == []


def test_a_half_precision_file_still_loads(adapter):
    _, folder = adapter
    _rewrite(folder, lambda t: {k: v.half() for k, v in t.items()})
    model = tiny_llama()
    lk.load_adapter(model, folder)
    assert {v.dtype for v in lk.adapter_state_dict(model).values()} == {torch.float32}


def test_a_key_outside_peft_layout_names_the_file(adapter):
    _, folder = adapter
    _rewrite(folder, lambda t: {k.replace("base_model.model.", ""): v for k, v in t.items()})
    with pytest.raises(lk.AdapterLoadError, match=rf"{folder}/adapter_model.safetensors: tensor 'model.layers"):
        lk.load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("below", ["", "sub"])
def test_save_onto_a_file_is_refused_and_the_file_kept(adapter, tmp_path, below):
    model, _ = adapter
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / below if below else tmp_path / "notes.txt"
    with pytest.raises(lk.AdapterError, match=r"notes.txt is a file, and an adapter is a folder"):
        lk.save_adapter(model, target)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("path", [None, 3, ["a"]])
def test_a_path_that_is_no_path_is_named(adapter, path):
    model, _ = adapter
    given = re.escape(repr(path))
    with pytest.raises(lk.AdapterError, match=rf"save_adapter takes an adapter folder.s path .*got {given}"):
        lk.save_adapter(model, path)
    with pytest.raises(lk.AdapterLoadError, match=rf"load_adapter takes an adapter folder.s path .*got {given}"):
        lk.load_adapter(model, path, "b")
    assert lk.adapter_names(model) == ["default"]


def test_a_shape_error_from_config_overrides_names_them_not_the_file(adapter):
    _, folder = adapter
    model = tiny_llama()
    with pytest.raises(lk.AdapterLoadError, match=r"config_overrides sets r=8, but the tensors were saved with r=4"):
        lk.load_adapter(model, folder, config_overrides={"r": 8})  # before: "adapter_config.json has r=8"
    assert lk.adapter_names(model) == []
