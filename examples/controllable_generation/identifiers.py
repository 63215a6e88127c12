"""Real sequences with a checkable property: Python standard-library identifiers, tagged by naming style.

No protein or nucleotide sequences ship with the packages this project installs, so the recipe's "sequences" are
the names the standard library really defines (the bundled base model was pretrained on stdlib source, as a
protein LM is pretrained on UniProt) and the property is the naming convention, which a regular expression checks
exactly, as a property predictor would score a generated protein:

- ``class``: CamelCase class names (``HTTPServer``, ``OrderedDict``);
- ``constant``: UPPER_CASE module constants with an underscore (``SEEK_END``, ``HIGHEST_PROTOCOL``);
- ``function``: snake_case public functions with an underscore (``make_archive``, ``get_terminal_size``);
- ``private``: private helpers, one underscore then lowercase (``_check_arg``, ``_parse_args``).

A name is split into train / held-out by a fixed hash of the text, so "novel" (not in the training names) and
"real" (a stdlib name of any split) can be measured for generated names.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import warnings

PATTERNS = {
    "class": re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*"),
    "constant": re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"),
    "function": re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+"),
    "private": re.compile(r"_[a-z][a-z0-9]*(?:_[a-z0-9]+)*"),
}
TAGS = tuple(PATTERNS)
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "pydoc_data",
        "ensurepip", "venv", "xxsubtype"}


def has_property(name: str, tag: str) -> bool:
    """Whether ``name`` is a whole identifier of the naming style ``tag`` (the checker)."""
    return PATTERNS[tag].fullmatch(name) is not None


def _kind(obj) -> str | None:
    if inspect.isclass(obj):
        return "class"
    if inspect.isroutine(obj):
        return "routine"
    if isinstance(obj, (int, str, float, bytes, tuple, frozenset)) and not isinstance(obj, bool):
        return "value"
    return None


def _tag(name: str, kind: str) -> str | None:
    if kind == "class" and has_property(name, "class"):
        return "class"
    if kind == "value" and has_property(name, "constant"):
        return "constant"
    if kind == "routine" and has_property(name, "function"):
        return "function"
    if kind == "routine" and has_property(name, "private"):
        return "private"
    return None


def stdlib_identifiers() -> dict[str, set[str]]:
    """Tag -> the stdlib names (top-level attributes of every importable pure stdlib module) of that style."""
    found: dict[str, set[str]] = {tag: set() for tag in TAGS}
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in names:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # platform modules (winreg, msvcrt, ...) and optional C extensions
                continue
            for attr, obj in vars(module).items():
                kind = _kind(obj)
                tag = _tag(attr, kind) if kind else None
                if tag is not None:
                    found[tag].add(attr)
    return found


def is_train(name: str, held_out_fraction: float = 0.2) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 >= held_out_fraction


def prompt_for(tag: str) -> str:
    """The conditioning prefix of a tag (the generated name follows it)."""
    return f"<tag={tag}>"
