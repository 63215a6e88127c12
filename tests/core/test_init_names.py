"""``init=`` (``add_adapter``, ``init_adapter``) and ``lorakit train --init`` take the same names: registered inits
(``lorakit.list_inits()``). PEFT spells every start in one field, ``LoraConfig.init_lora_weights`` (True, False,
"gaussian", "orthogonal", "pissa", "olora", "loftq", "eva", "corda", ...: peft/tuners/lora/config.py); lorakit's
``LoraConfig.init_lora_weights`` takes all of them, and ``init=`` / ``--init`` only those an init of lorakit's runs.
Before, ``add_adapter(..., init="gaussian")`` (and ``init=True``) quietly set the config value that ``--init gaussian``
refused, and ``init_adapter(..., init="gaussian")`` called it an unknown init."""

from __future__ import annotations

import peft
import pytest

import lorakit as lk
from lk_models import tiny_llama

CFG = dict(r=4, target_modules=["q_proj"])


@pytest.mark.parametrize("value", ["gaussian", "orthogonal", "mica"])
def test_a_value_of_init_lora_weights_given_as_init_names_the_field(value):
    peft.LoraConfig(init_lora_weights=value)  # PEFT's value for its one field
    model = tiny_llama()
    says = rf"'{value}' is no registered init .* LoraConfig.init_lora_weights; set it there: " \
           rf"LoraConfig\(\.\.\., init_lora_weights='{value}'\)"
    with pytest.raises(lk.ConfigError, match=says):
        lk.add_adapter(model, lk.LoraConfig(**CFG), init=value)
    assert lk.adapter_names(model) == []
    lk.add_adapter(model, lk.LoraConfig(**CFG))
    with pytest.raises(lk.ConfigError, match=says):
        lk.init_adapter(model, "default", init=value)
    assert lk.adapter_state_dict(model)  # the adapter is still there, its config unchanged
    assert lk.core.model.adapter_state(model).configs["default"].init_lora_weights is True


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_init_is_refused_naming_the_config_value(value):
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match=rf"init={value}: init names a registered init, as a string"):
        lk.add_adapter(model, lk.LoraConfig(**CFG), init=value)
    assert lk.adapter_names(model) == []


def test_the_config_field_takes_the_value():
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(**CFG, init_lora_weights="gaussian"))
    assert lk.core.model.adapter_state(model).configs["default"].init_lora_weights == "gaussian"
