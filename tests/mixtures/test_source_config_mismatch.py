"""A mixture built from existing LoRA folders (adapter_paths) whose source's adapter_config.json was edited (r) is
refused naming the folder, the module and the config field, as load_adapter and lorakit inspect name it."""

from __future__ import annotations

import json
import shutil

import pytest

import lorakit as lk

from lk_models import tiny_llama


@pytest.mark.parametrize("name", ["xlora", "meteora", "routed_lora"])
def test_a_source_whose_r_was_edited_is_refused_naming_the_field(name, tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**raw, "r": 8}))
    config = lk.get_method(name).config_cls(adapter_paths=[str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(lk.AdapterLoadError, match=r"source adapter .*a \(module 'model.layers.0.self_attn.q_proj'\): "
                                                  r".*its adapter_config.json says r=8, but the tensors have rank 4"):
        lk.add_adapter(tiny_llama(), config)
