"""The recipes' command lines (examples/*): every flag with a default says it in --help, and a count below its
minimum is refused by its flag before any work (data, models, training)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = {"controllable_generation": "run.py", "seq_classification": "run.py", "fewshot_vs_qlora": "fewshot_vs_qlora.py",
           "small_data_speech": "speech_s2lora.py"}


def _main(recipe: str):
    folder = EXAMPLES / recipe
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_cli_{recipe}", folder / RECIPES[recipe])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module.main
    finally:
        sys.path.remove(str(folder))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_help_states_every_default(recipe, monkeypatch, capsys):
    """Was: --batch-size, --lr, --seed, --max-new-tokens, ... listed without their defaults (plain argparse)."""
    seen = []
    original = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: (seen.append(self),
                                                                                       original(self, file)))
    with pytest.raises(SystemExit) as stop:
        _main(recipe)(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    parser = seen[-1]
    missing = [a.option_strings[-1] for a in parser._actions  # noqa: SLF001
               if a.option_strings and a.default is not None and a.default is not False and a.default != argparse.SUPPRESS
               and "default" not in (parser._get_formatter()._get_help_string(a) if a.help else "")]  # noqa: SLF001
    assert not missing, missing
    assert "(default: " in text


BAD = [  # recipe, a count below its minimum; each used to fail only after work, or not at all
    ("controllable_generation", ["--samples", "0"], "positive integer"),  # was: IndexError after training
    ("controllable_generation", ["--max-new-tokens", "0"], "positive integer"),  # was: transformers' ValueError
    ("controllable_generation", ["--shots", "-1"], "integer >= 0"),  # was: prompts of "-", a table written
    ("seq_classification", ["--limit", "0"], "positive integer"),
    ("seq_classification", ["--max-length", "1"], "integer >= 2 (a token to predict from and one to predict)"),
    ("small_data_speech", ["--sizes", "8", "0"], "positive integer"),
    ("small_data_speech", ["--test", "0"], "positive integer"),
    ("fewshot_vs_qlora", ["--seed", "-1"], "integer >= 0"),
]


@pytest.mark.parametrize("recipe,flags,says", BAD, ids=[f"{r}{f[0]}" for r, f, _ in BAD])
def test_a_bad_count_is_refused_by_its_flag_before_any_work(recipe, flags, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _main(recipe)([*flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: argument {flags[0]}: must be {'a ' if 'positive' in says else 'an '}" \
        f"{says}, got {flags[-1]}" in err, err
    assert not (tmp_path / "out").exists()
