"""Every subcommand's --help shows its defaults as values or words: no "default: None", no empty "default: ", no
"(default: [])" / "{}" / "''".

Was: `lorakit pretrain-base --help` printed "--mixture MIXTURE  default: " (its empty-string defaults shown as
nothing), `compose-image` printed "(default: None)" for eight flags, `transfer` "default: None", and the method
options of `train` "(default: None)" / "(default: {})". The walk follows nested subcommands (bench, diffusion)
and `train --method NAME` / `--procedure NAME` for every registered one, so a new flag is checked when it is added."""

from __future__ import annotations

import json
import re

import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.training import list_procedures

# an unset value, or nothing at all before the next flag ("(default: --warmup-ratio)", naming a flag, is a value)
EMPTY = re.compile(r"default: ?(?:None\b|''|\[\]|\{\}|\)|$)|(?<!\()default: ?(?=--[a-z])")


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0, argv
    out = capsys.readouterr().out
    return re.sub(r"\s+", " ", out)  # argparse's wrapped help lines joined, its column padding dropped


def _subcommands(text: str) -> list[str]:
    """The {a,b,c} choices of a parser's subcommand positional, read from its help."""
    m = re.search(r"positional arguments: \{([\w,\-]+)\}", text)
    return m.group(1).split(",") if m else []


def _commands(capsys) -> list[list[str]]:
    """Every subcommand, nested ones included (a command whose positional is a plain choice, like `bench`'s
    experiment, shows the same choices under each: those are not subcommands)."""
    found, todo = [], [([name], []) for name in _subcommands(_help(capsys, []))]
    while todo:
        argv, parent_choices = todo.pop(0)
        found.append(argv)
        choices = _subcommands(_help(capsys, argv))
        if choices != parent_choices and len(argv) < 3:
            todo += [(argv + [n], choices) for n in choices]
    return found


def test_every_subcommand_help_shows_its_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    commands = _commands(capsys)
    names = {" ".join(c) for c in commands}
    assert {"train", "pretrain-base", "compose-image", "transfer", "serve", "diffusion train-base"} <= names, names
    commands += [["train", "--method", m.name] for m in lk.list_methods()]
    commands += [["train", "--procedure", p.name] for p in list_procedures()]
    bad = {}
    for argv in commands:
        text = _help(capsys, argv)
        hits = [text[max(0, m.start() - 70):m.end() + 10] for m in EMPTY.finditer(text)]
        if hits:
            bad[" ".join(argv)] = hits
    assert not bad, json.dumps(bad)


def test_pretrain_base_help_says_what_its_empty_defaults_mean(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help(capsys, ["pretrain-base"])
    assert "(default: none, the stdlib + tasks corpus)" in text
    assert "(default: none, a new one of --vocab-size tokens is trained)" in text
    assert "--steps STEPS optimizer steps (default: 1500)" in text


def test_pretrain_base_help_is_each_fields_metadata(capsys, monkeypatch):
    """Issue 36, item 4: the flags' help lives on the fields (``field(metadata={"help": ...})``, read by
    cli_options.field_help), not in a dict beside the dataclass; the corpus's ``seed`` (``--corpus-seed``) has its
    own text, not a special case in the flag builder. Was: every line below, from ``FIELD_HELP``."""
    import dataclasses

    from lorakit.pretrain.corpus import CorpusConfig
    from lorakit.pretrain.train import PretrainConfig

    monkeypatch.setenv("COLUMNS", "200")
    text = _help(capsys, ["pretrain-base"])
    for cls, prefix in ((PretrainConfig, ""), (CorpusConfig, "corpus-")):
        for f in dataclasses.fields(cls):
            if f.name == "corpus":
                continue
            flag = "--" + ("" if cls is PretrainConfig or f.name != "seed" else prefix) + f.name.replace("_", "-")
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            # "--steps STEPS optimizer steps", "--bf16, --no-bf16 bf16 autocast ..."
            assert re.search(re.escape(flag) + r"(?: [A-Z_]+|, --no-\S+) " + re.escape(f.metadata["help"]), text), flag
    assert "--seed SEED seed of the model and the data order (default: 0)" in text
    assert "--corpus-seed CORPUS_SEED seed of the corpus's stdlib sampling (default: 0)" in text


def test_compose_image_help_shows_the_method_configs_defaults(capsys, monkeypatch):
    """--switch-step / --cache-interval default to None (the method's config decides); their help quotes the
    configs' own defaults (was: literals 5 and 2 written beside them, free to drift from the dataclasses)."""
    from lorakit.diffusion.methods.cmlora import CMLoRAConfig
    from lorakit.diffusion.methods.switch import SwitchConfig

    monkeypatch.setenv("COLUMNS", "200")
    text = _help(capsys, ["compose-image"])
    assert f"switch: steps per LoRA (default: {SwitchConfig().switch_step})" in text
    assert f"cmlora: cache refresh period (default: {CMLoRAConfig().cache_interval})" in text


def test_every_flag_with_a_default_says_it_in_its_help(capsys, monkeypatch):
    """A flag whose default is a value (not None / False / empty) shows it in --help, on every subcommand. Was:
    `lorakit regmix --help` listed 14 flags (--n-proxies, --steps, --lr, ...) with no help and no default at all
    (its parser had no defaults formatter), and `lorakit infer-mixture --help` hid --sample-chars and --merges'."""
    import argparse

    monkeypatch.setenv("COLUMNS", "160")
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def keep(self, file=None):
        seen.append(self)
        return original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", keep)
    bad = {}
    for argv in _commands(capsys):
        seen.clear()
        _help(capsys, argv)
        parser = seen[-1]
        formatter = parser._get_formatter()  # noqa: SLF001 (the help text argparse prints for one flag)
        for action in parser._actions:  # noqa: SLF001
            default = action.default
            if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS \
                    or (isinstance(default, (str, list, tuple, dict)) and not default):
                continue
            text = formatter._get_help_string(action) if hasattr(formatter, "_get_help_string") else action.help
            if "default" not in (text or ""):
                bad.setdefault(" ".join(argv), []).append(action.option_strings[-1])
    assert not bad, json.dumps(bad)
