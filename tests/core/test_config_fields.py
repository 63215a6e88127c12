"""Every config's own value checks carry the field they reject as data (``ConfigError.field``), as the shared
validators do (tests/core/test_config_errors.py): a command line then words the message with the flag the user typed
(``--r must be a positive integer``) from the field itself, not by finding the name in the text.

Parametrised over every registered method (each variant), every registered training procedure, and lorakit's other
configs: each int field set to 0 and -1, each float field set to -1 and 2. A value the config accepts is fine; one
it refuses must be a ConfigError whose ``field`` is ``<Class>.<that field>`` (or the bare name, for the configs whose
messages answer an HTTP request's keys: SamplingParams, SelfMoAConfig, MergeOptions' flags).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

import lorakit as lk
from lorakit.core.errors import ConfigError
from lorakit.training import TrainConfig, list_procedures


def _other_configs():
    """(config class, kwargs that make a valid one) for lorakit's configs outside the two registries."""
    from lorakit.bench.serve import ServeProfile
    from lorakit.compose.icm_lora import CvaeConfig
    from lorakit.compose.icm_lora_generator import IcmLoraConfig
    from lorakit.compose.methods import MergeOptions
    from lorakit.compose.translora import TransLoraConfig
    from lorakit.federated.base import FederatedConfig
    from lorakit.pretrain.corpus import CorpusConfig
    from lorakit.pretrain.loram_align import AlignConfig
    from lorakit.pretrain.regmix import RegMixConfig
    from lorakit.pretrain.train import PretrainConfig
    from lorakit.pretrain.ul2 import Denoiser
    from lorakit.prune.loram import LoramConfig
    from lorakit.quantize.cbq import CBQConfig
    from lorakit.quantize.uniform import QuantSpec
    from lorakit.serving.sampling import SamplingParams
    from lorakit.serving.self_moa import SelfMoAConfig
    from lorakit.serving.server import ServerLimits

    return [(TrainConfig, {}), (MergeOptions, {}), (TransLoraConfig, {}), (IcmLoraConfig, {}), (CvaeConfig, {}),
            (FederatedConfig, {}), (PretrainConfig, {}), (RegMixConfig, {}), (CorpusConfig, {}), (AlignConfig, {}),
            (Denoiser, {"mode": "R", "rate": 0.15}), (LoramConfig, {}), (CBQConfig, {}), (QuantSpec, {}),
            (SamplingParams, {}), (SelfMoAConfig, {}), (ServerLimits, {}), (ServeProfile, {})]


def _configs():
    seen = set()
    for method in lk.list_methods():
        for variant, kwargs in method.variants.items():
            yield f"method={method.name}-{variant}", method.config_cls, dict(kwargs)
    for procedure in list_procedures():
        yield f"procedure={procedure.name}", procedure.config_cls, {}
    for cls, kwargs in _other_configs():
        if cls not in seen:
            seen.add(cls)
            yield cls.__name__, cls, kwargs


BAD = {int: (0, -1), float: (-1.0, 2.0)}


def _scalar(hint) -> type | None:
    """int or float for a field typed ``int``, ``float`` or either ``| None``; None otherwise."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return args[0] if len(args) == 1 and args[0] in BAD else None


def _bad_values(cls):
    """(field name, bad value) for every int / float field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f.name, value) for f in dataclasses.fields(cls) if f.init
            for value in BAD.get(_scalar(hints[f.name]), ())]


CONFIGS = list(_configs())


def test_the_matrix_covers_every_registered_config():
    covered = {cls for _, cls, _ in CONFIGS if _bad_values(cls)}
    assert {m.config_cls for m in lk.list_methods()} <= covered
    assert {p.config_cls for p in list_procedures() if _bad_values(p.config_cls)} <= covered


@pytest.mark.parametrize("cls,kwargs", [pytest.param(c, k, id=w) for w, c, k in CONFIGS])
def test_a_refused_value_names_its_field(cls, kwargs):
    cls(**kwargs)  # the base case is valid
    wrong = []
    for name, value in _bad_values(cls):
        try:
            cls(**{**kwargs, name: value})
        except ConfigError as e:
            # "<Class>.<name>", or the bare name where the message answers a request or a flag of that name as it reads
            if e.field not in (f"{cls.__name__}.{name}", name) or name not in str(e):
                wrong.append(f"{name}={value!r}: field={e.field!r}: {e}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("flags,says", [
    (["--method", "mola", "--r", "0"], "--r must be a positive integer, got 0."),
    (["--method", "smora", "--r", "4", "--top-k", "5"], "--top-k must be in 1..r=4 (the ranks it picks from), got 5."),
    (["--method", "increlora", "--top-h", "0"], "--top-h must be a positive integer, got 0."),
    (["--method", "mixda", "--num-experts", "2", "--gate-dropout", "1.5"], "--gate-dropout must be in [0, 1), got 1.5."),
    (["--method", "dylora", "--r", "4", "--rank", "5"], "--rank=5 must be in 1..r=4"),
    (["--procedure", "loraprune", "--ratio", "1.0"], "--ratio must be in [0, 1)"),
])
def test_train_words_a_methods_own_check_with_the_flag_from_its_field(flags, says, tmp_path, capsys, monkeypatch):
    """The flag comes from the error's field: with cli_parser's pattern matching switched off, the same words."""
    import lorakit.cli_parser
    from lorakit.cli import main

    monkeypatch.setattr(lorakit.cli_parser, "with_flags", lambda message, flags, negated=None: message)
    assert main(["train", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit train: error: {says}") and "Traceback" not in err, err


@pytest.mark.parametrize("make,field", [
    (lambda: lk.get_method("mixda").config_cls(), "MixdaConfig.num_experts"),  # neither num_experts nor domains
    (lambda: lk.LoraConfig(layers_pattern="layers"), "LoraConfig.layers_pattern"),  # without layers_to_transform
])
def test_a_missing_or_unpaired_value_names_its_field(make, field):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == field


def _scaling_fields():
    """(id, config class, variant kwargs, field, kind) for every registered variant's PEFT-named scaling numerator
    (``lora_alpha`` and the methods' own alphas) and adapter dropout."""
    for method in lk.list_methods():
        names = {f.name for f in dataclasses.fields(method.config_cls)}
        for variant, kwargs in method.variants.items():
            for name in sorted(names & {"lora_alpha", "expert_lora_alpha", "randlora_alpha", "lora_dropout"}):
                yield pytest.param(method.config_cls, dict(kwargs), name, id=f"method={method.name}-{variant}-{name}")


@pytest.mark.parametrize("cls,kwargs,name", list(_scaling_fields()))
def test_alpha_and_dropout_are_checked_in_every_method(cls, kwargs, name):
    """An adapter's update is scaled by alpha / r (LoRA, arXiv:2106.09685 §4.1; PEFT's ``scaling``): alpha must be a
    finite number > 0, else the adapter trains NaNs (NaN, inf), nothing (0) or the opposite of its gradient's
    direction (< 0). A dropout is a probability in [0, 1) (1 drops every input). Before, only LoRA / FFA-LoRA
    checked alpha and several mixtures the dropout; 18 other methods trained with lora_alpha=nan."""
    bad = [0.0, -1.0, float("nan"), float("inf")] if name.endswith("alpha") else [-0.1, 1.0, float("nan")]
    for value in bad:
        with pytest.raises(ConfigError) as info:
            cls(**{**kwargs, name: value})
        assert info.value.field == f"{cls.__name__}.{name}", value
    good = 0.5 if name.endswith("dropout") else 3.0
    assert getattr(cls(**{**kwargs, name: good}), name) == good
