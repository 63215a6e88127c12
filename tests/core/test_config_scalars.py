"""Every registered method's float options refuse NaN, ±inf and negative values: a loss coefficient of inf (γ-MoD's,
MoLE's, MixLoRA's ``router_aux_loss_coef``) turns the first step's loss into NaN and trains garbage, a negative one
rewards the imbalance it should penalise, and ``lora_alpha`` scales the update by lora_alpha / r (Hu et al.,
arXiv:2106.09685 §4.1; PEFT's ``scaling = lora_alpha / r``), so a non-positive or infinite alpha trains an adapter
that does nothing, the opposite, or overflows. LoRA refused these; the other methods took them silently."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.core.errors import ConfigError

# A float option that legitimately takes a negative value is listed here (none so far).
NEGATIVE_OK: set[tuple[str, str]] = set()

FLOAT_FIELDS = [(m.name, f.name) for m in lk.list_methods()
                for f in dataclasses.fields(m.config_cls)
                if f.init and "float" in str(typing.get_type_hints(m.config_cls)[f.name])]


def test_the_mixtures_float_options_are_covered():
    covered = set(FLOAT_FIELDS)
    for pair in [("gamma_mod", "router_aux_loss_coef"), ("mixlora", "router_aux_loss_coef"),
                 ("mixlora", "jitter_noise"), ("mole", "router_aux_loss_coef"), ("mola", "router_aux_loss_coef"),
                 ("mola", "lora_dropout"), ("smora", "lora_alpha")]:
        assert pair in covered


@pytest.mark.parametrize("method,name", FLOAT_FIELDS, ids=[f"{m}-{n}" for m, n in FLOAT_FIELDS])
def test_a_float_option_refuses_nan_inf_and_negatives(method, name):
    cls = lk.get_method(method).config_cls
    bad = [math.nan, math.inf, -math.inf] + ([] if (method, name) in NEGATIVE_OK else [-1.0])
    for value in bad:
        with pytest.raises(ConfigError) as e:
            cls(**{name: value})
        assert e.value.field is not None  # the error names the field (a command line words it as the flag)


def test_lora_alpha_pattern_values_are_checked_as_lora_alpha():
    for value in (0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="alpha_pattern"):
            lk.LoraConfig(alpha_pattern={"q_proj": value})


def test_cli_names_the_flag_before_loading_a_model(capsys, tmp_path):
    code = main(["train", "--method", "gamma_mod", "--router-aux-loss-coef", "inf", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--router-aux-loss-coef must be >= 0 and finite, got inf" in err
    assert not (tmp_path / "o").exists()
