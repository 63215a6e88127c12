"""README.md and docs/*.md name only what exists: relative links resolve, every ``lorakit CMD`` they show is a
command of ``lorakit --help`` (and every command there is documented), and every ``--flag`` of a shown
``lorakit ...`` command line is one that command's ``--help`` lists (``train`` with its ``--method`` /
``--procedure``, whose options become flags)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `lorakit WORD` in prose that is not a command ("lorakit as a ...", "lorakit adds ...")
PROSE = {"as", "adds", "cannot", "file"}  # prose: "what lorakit cannot honour", "a lorakit file records"


@lru_cache(maxsize=None)
def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def subcommands() -> list[str]:
    usage = help_text()
    return re.search(r"\{([a-z,-]+)\}", usage).group(1).split(",")


def shown_command_lines(path: Path) -> list[str]:
    """The lines of code blocks (continuations joined) and the inline code spans that mention ``lorakit``."""
    text = path.read_text()
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    return [line.split(" #", 1)[0] for line in lines + re.findall(r"`([^`\n]*lorakit [^`\n]*)`", text)]


def shown_commands(path: Path) -> list[tuple[list[str], str]]:
    """(the help argv of each ``lorakit CMD ...`` shown, the rest of its line)."""
    found = []
    for line in shown_command_lines(path):
        for m in re.finditer(r"lorakit (?:-- )?([a-z][a-z-]+)((?: [^|;&]*)?)", line):
            command, rest = m.group(1), m.group(2)
            if command in PROSE:
                continue
            try:
                words = shlex.split(rest)
            except ValueError:
                words = rest.split()
            argv = [command]
            if command in ("bench", "diffusion") and words and re.fullmatch(r"[a-z_-]+", words[0]):
                argv.append(words[0])  # its subcommand has its own flags
            if command == "generate-adapter" and words[:1] == ["train"]:
                argv.append("train")
            for option in ("--method", "--procedure"):
                if command == "train" and option in words[:-1]:
                    value = words[words.index(option) + 1]
                    if re.fullmatch(r"[a-z0-9_]+", value):
                        argv += [option, value]
            found.append((argv, rest))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = [link for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
              if not link.startswith(("http://", "https://", "#"))
              and not (doc.parent / link.split("#")[0]).exists()]
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_shown_commands_exist(doc):
    commands = set(subcommands())
    assert sorted({argv[0] for argv, _ in shown_commands(doc)} - commands) == []


def test_every_command_is_documented():
    shown = {argv[0] for doc in DOCS for argv, _ in shown_commands(doc)}
    assert sorted(set(subcommands()) - shown) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_shown_flags_exist(doc):
    unknown, commands = [], set(subcommands())
    for argv, rest in shown_commands(doc):
        if argv[0] not in commands:
            continue  # test_shown_commands_exist reports it
        text = help_text(*argv)
        assert "usage:" in text, f"lorakit {' '.join(argv)} --help: {text}"
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if not re.search(re.escape(flag) + r"(?![\w-])", text):
                unknown.append(f"lorakit {' '.join(argv)} {flag}")
    assert unknown == []
