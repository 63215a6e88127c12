"""The shared config validators (core.config: check_field_types, check_positive_ints, AdapterConfig's regex check)
carry the field they reject as data (``ConfigError.field``): Python reads the same text as before, a command line
words it with the flag typed, exactly, without finding the name in the text by pattern (cli_parser.with_flags)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lorakit.cli import main
from lorakit.cli_parser import CommandParser
from lorakit.core.config import check_field_types, check_positive_ints
from lorakit.core.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.methods.smora import SmoraConfig
from lorakit.training import TrainConfig


@dataclass
class _Counts:
    n_blocks: int = 1
    ratio: float = 0.5


def _raised(make) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        make()
    return e.value


CASES = [  # what raises, its field, its text from Python (unchanged), its text under --n-blocks / --ratio / ...
    (lambda: check_positive_ints(_Counts(n_blocks=0), "n_blocks"), "_Counts.n_blocks",
     "_Counts.n_blocks must be a positive integer, got 0.", "--n-blocks must be a positive integer, got 0."),
    (lambda: check_field_types(_Counts(ratio="half")), "_Counts.ratio",
     "_Counts.ratio must be float, got 'half' (str).", "--ratio must be float, got 'half' (str)."),
    (lambda: TrainConfig(batch_size=0), "TrainConfig.batch_size", "TrainConfig.batch_size must be a positive integer, "
     "got 0.", "--batch-size must be a positive integer, got 0."),
    (lambda: LoraConfig(target_modules="(q"), "LoraConfig.target_modules",
     "LoraConfig.target_modules='(q' is not a valid regular expression: missing ), unterminated subpattern at "
     "position 0", "--target-modules='(q' is not a valid regular expression: missing ), unterminated subpattern at "
     "position 0"),
]


@pytest.mark.parametrize("make,field,text,worded", CASES, ids=[c[1] for c in CASES])
def test_shared_validators_name_their_field_as_data(make, field, text, worded, monkeypatch):
    error = _raised(make)
    assert error.field == field and str(error) == text
    parser = CommandParser(prog="lorakit x")
    for flag in ("--n-blocks", "--ratio", "--batch-size", "--target-modules"):
        parser.add_argument(flag)
    import lorakit.cli_parser

    # the flag comes from the field, not from the text: with no pattern matching at all, the same words
    monkeypatch.setattr(lorakit.cli_parser, "with_flags", lambda message, flags, negated=None: message)
    assert parser.message(error) == worded


@pytest.mark.parametrize("value", [float("nan"), 2.5, True])
def test_positive_ints_refuse_nan_fractions_and_bools(value):
    """A bare ``value <= 0`` let NaN (every comparison is False) and 2.5 through as 'positive integers' (e.g.
    TransLoraConfig(steps=nan), IcmLoraConfig(epochs=2.5)); 3.0 (a JSON number) stays accepted."""
    assert _raised(lambda: check_positive_ints(_Counts(n_blocks=value), "n_blocks")).field == "_Counts.n_blocks"
    check_positive_ints(_Counts(n_blocks=3.0), "n_blocks")


def test_a_qualified_field_flag_wins_over_the_plain_one():
    """``field_flags`` keyed ``Class.field`` (a config whose field has another flag) is the flag it gets."""
    error = _raised(lambda: check_positive_ints(_Counts(n_blocks=0), "n_blocks"))
    parser = CommandParser(prog="lorakit x", field_flags={"_Counts.n_blocks": "--blocks"})
    parser.add_argument("--n-blocks")
    assert parser.message(error) == "--blocks must be a positive integer, got 0."


@pytest.mark.parametrize("flags,says", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0."),
    (["--steps", "0"], "--steps must be a positive integer, got 0."),
    (["--rank-pattern", '{"q_proj": "x"}'], "--rank-pattern must be dict[str, int], got {'q_proj': 'x'} (dict)."),
    (["--target-modules", "(q"], "--target-modules (q is not a valid regular expression"),
])
def test_train_words_the_validators_errors_with_its_flags(flags, says, tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit train: error: {says}") and "Traceback" not in err, err


@pytest.mark.parametrize("make,field", [
    (lambda: TrainConfig(weight_decay=float("nan")), "TrainConfig.weight_decay"),
    (lambda: SmoraConfig(bias_update_rate=float("nan")), "SmoraConfig.bias_update_rate"),
])
def test_non_negative_refuses_nan(make, field):
    """``check_non_negative`` tested ``value < 0``, which NaN passes: ``TrainConfig(weight_decay=nan)`` was accepted
    and AdamW's decoupled decay (w -= lr·wd·w) turned every trained weight to NaN at the first step. NaN is not
    >= 0 (IEEE 754: every comparison with NaN is false), as check_positive and check_range already treat it."""
    error = _raised(make)
    assert error.field == field and "must be >= 0" in str(error) and "nan" in str(error)


def test_an_unknown_procedure_names_its_field():
    """TrainConfig(procedure="galor") from Python: the one TrainConfig error without its field (get_procedure's own
    ConfigError passed through); a command line's --procedure is argparse's choices."""
    error = _raised(lambda: TrainConfig(procedure="galor"))
    assert error.field == "TrainConfig.procedure"
    assert str(error).startswith("TrainConfig.procedure: unknown training procedure 'galor'.") and "galore" in str(error)


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_train_config_refuses_an_infinite_step(field):
    """lr=inf or weight_decay=inf passed the > 0 / >= 0 checks; AdamW's first step then turns every trained weight to
    inf / NaN (w -= lr·(m̂/(√v̂+ε) + wd·w))."""
    error = _raised(lambda: TrainConfig(**{field: float("inf")}))
    assert error.field == f"TrainConfig.{field}" and "and finite" in str(error) and "inf" in str(error)
