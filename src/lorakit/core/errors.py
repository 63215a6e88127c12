"""Errors lorakit raises. Every message says what was wrong and what to do about it."""

from __future__ import annotations

import difflib
from typing import Iterable


class LorakitError(Exception):
    """Base class of lorakit's own errors."""


class ConfigError(LorakitError, ValueError):
    """An adapter config is invalid (unknown field, wrong type, bad value)."""


class UnknownMethodError(LorakitError, KeyError):
    """A method name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TargetError(LorakitError, ValueError):
    """Target patterns matched nothing, or matched a module lorakit cannot adapt."""


class AdapterError(LorakitError, ValueError):
    """Misuse of named adapters (unknown name, duplicate name, merged state)."""


class AdapterLoadError(LorakitError, ValueError):
    """An adapter on disk cannot be loaded; the model is left as it was."""


def near_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest candidates to ``name``, best first (for "did you mean" hints)."""
    cands = sorted(set(candidates))
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not found:
        # Dotted module paths: compare last components too, so "q_prj" still finds "...self_attn.q_proj".
        tails = {c.rsplit(".", 1)[-1]: c for c in cands}
        found = [tails[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=n, cutoff=0.5)]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = near_matches(name, candidates)
    return f" Did you mean: {', '.join(found)}?" if found else ""
