"""NumPy scalars are plain numbers to the configs and init options (a rank read from an array, a sweep grid or a
pandas frame is ``np.int64``, an alpha ``np.float32``). PEFT's ``LoraConfig`` takes them as given (a dataclass
without type checks); lorakit refused them as "must be int" / "must be float". They now count as the Python number
they hold (``.item()``), which is also what the saved JSON holds."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch

import lorakit as lk
from lk_models import tiny_llama
from lorakit.training import TrainConfig

NUMPY = dict(r=np.int64(4), lora_alpha=np.float32(8.0), lora_dropout=np.float64(0.0), use_rslora=np.bool_(False),
             target_modules=["q_proj", "v_proj"], layers_to_transform=[np.int32(0), np.int64(1)],
             rank_pattern={"v_proj": np.int16(2)}, alpha_pattern={"v_proj": np.float16(4.0)})
PLAIN = dict(r=4, lora_alpha=8.0, lora_dropout=0.0, use_rslora=False, target_modules=["q_proj", "v_proj"],
             layers_to_transform=[0, 1], rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4.0})


def test_peft_takes_numpy_scalars():
    assert peft.LoraConfig(**NUMPY).r == 4  # the reference behaviour: no refusal


def test_lora_config_takes_numpy_scalars_as_python_numbers(tmp_path):
    config = lk.LoraConfig(**NUMPY)
    assert config == lk.LoraConfig(**PLAIN)
    assert type(config.r) is int and type(config.lora_alpha) is float and type(config.use_rslora) is bool
    assert [type(i) for i in config.layers_to_transform] == [int, int]
    assert type(config.rank_pattern["v_proj"]) is int and type(config.alpha_pattern["v_proj"]) is float
    model = tiny_llama()
    lk.add_adapter(model, config)
    lk.save_adapter(model, tmp_path / "a")  # JSON: np.float32 would not serialise
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["rank_pattern"] == {"v_proj": 2}


@pytest.mark.parametrize("value", [np.float32(0.5), np.array([1, 2])[0], np.str_("x")])
def test_a_numpy_value_of_the_wrong_kind_is_still_refused(value):
    with pytest.raises(lk.ConfigError, match="LoraConfig.use_dora must be bool"):
        lk.LoraConfig(use_dora=value)


def test_train_config_takes_numpy_scalars():
    config = TrainConfig(steps=np.int64(3), lr=np.float32(1e-3))
    assert config.steps == 3 and type(config.steps) is int and type(config.lr) is float


def test_init_options_take_numpy_scalars(ids):
    """EVA's options (``rho`` float, ``max_passes`` int) as NumPy scalars run the init exactly as Python numbers do."""
    batches = [{"input_ids": ids}]
    results = []
    for rho, passes in ((np.float32(2.0), np.int64(3)), (2.0, 3)):
        model = tiny_llama()
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "e")
        lk.init_adapter(model, "e", batches, init="eva", rho=rho, max_passes=passes)
        results.append({k: v.clone() for k, v in lk.adapter_state_dict(model, "e").items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)
