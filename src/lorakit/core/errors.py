"""Errors lorakit raises. Every message says what was wrong and what to do about it."""

from __future__ import annotations

import difflib
import itertools
import os
from pathlib import Path
from typing import Iterable, Sequence


FIELD = "{field}"  # where a message with a ``field`` names it


class LorakitError(Exception):
    """Base class of lorakit's own errors.

    ``field`` (optional): the setting the error is about, as data (a config field or argument name, e.g.
    ``"steps"``, or ``"Class.field"``). The message then writes ``{field}`` where it names it: from Python it
    reads with the name (``steps must be > 0``), a command line words it with the flag the user typed
    (:meth:`worded`, ``--steps must be > 0``) without guessing where the name stands in the text.
    """

    def __init__(self, *args, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field

    def worded(self, name: str) -> str:
        """The message with the field called ``name``."""
        text = super().__str__()
        return text.replace(FIELD, name) if self.field is not None else text

    def __str__(self) -> str:
        return self.worded(self.field) if self.field is not None else super().__str__()

    def __reduce__(self):
        # pickle (an error sent back from a worker process, copy.deepcopy) rebuilds an exception by calling its class
        # with its args; a subclass whose __init__ takes other arguments than its message (TrainingInterrupted(step,
        # total_steps, checkpoint)) could not be rebuilt so. Rebuilt here from the message and the attributes,
        # without __init__, for every subclass.
        return _rebuild, (type(self), self.args), self.__dict__


def _rebuild(cls: type[LorakitError], args: tuple) -> LorakitError:
    """An instance of ``cls`` with ``args`` and no attributes yet (``__reduce__``'s state sets them)."""
    return cls.__new__(cls, *args)


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


class UnknownAdapterError(AdapterError):
    """An adapter name that is not loaded or registered (its message lists near matches). A server answers it with a
    404 by this type, never by reading the message."""


class AdapterConflictError(AdapterError):
    """An adapter operation that conflicts with the adapter's current state, not with the request itself: loading a
    name that is loaded, being loaded or being unloaded; unloading one that is being loaded or unloaded. A server
    answers it with a 409; retrying after the other operation finishes can succeed."""


class AdapterLoadError(LorakitError, ValueError):
    """An adapter on disk cannot be loaded; the model is left as it was."""


def near_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest candidates to ``name``, best first (for "did you mean" hints). A ``name`` that is not a str (a bad
    value being reported: a torch dtype, an int, None) is compared as its ``str``, so the hint never raises."""
    name = name if isinstance(name, str) else str(name)
    cands = sorted(set(candidates))
    # compared lower-cased: difflib scores "TIES" against "ties" 0, so a capitalised name would list nothing;
    # candidates equal but for case are all kept, the one written most like ``name`` first
    lowered: dict[str, list[str]] = {}
    for c in cands:
        lowered.setdefault(c.lower(), []).append(c)

    def spelled_like_name(group: list[str]) -> list[str]:
        return sorted(group, key=lambda c: -difflib.SequenceMatcher(None, name, c).ratio())

    close = [c for low in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
             for c in spelled_like_name(lowered[low])]
    found = list(dict.fromkeys(spelled_like_name(lowered.get(name.lower(), [])) + close))[:n]
    if not found:
        # Dotted module paths: compare last components too, so "q_prj" still finds "...self_attn.q_proj".
        tails = {c.rsplit(".", 1)[-1]: c for c in cands}
        found = [tails[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=n, cutoff=0.5)]
    if not found:
        # A name as papers write it: "FLoRA" / "LoRA-FAIR" for flora / lora_fair (case and '-' vs '_' aside)
        folded = {c.lower().replace("-", "_"): c for c in cands}
        found = [folded[f] for f in difflib.get_close_matches(name.lower().replace("-", "_"), list(folded), n=n,
                                                              cutoff=0.5)]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = near_matches(name, candidates)
    return f" Did you mean: {', '.join(found)}?" if found else ""


PATH_HINT_ENTRIES = 2000  # folders with more entries get no path hint: difflib over 100k names takes ~20 s


def did_you_mean_path(path: str | os.PathLike) -> str:
    """``" Did you mean: P1, P2?"`` for a ``path`` that does not exist: its first missing component replaced by the
    near matches among the entries of the folder that does exist (``runs/c/rotat/adapter`` ->
    ``runs/c/rotate/adapter``); ``""`` when none is near, ``path`` exists, or the hint cannot be had cheaply and
    safely: a folder of more than ``PATH_HINT_ENTRIES`` entries (matching them all costs seconds), a component
    that cannot be looked up (no permission, a name too long, a NUL byte). Never raises: it decorates an error."""
    try:
        parts = Path(path).parts
        for i in range(len(parts)):
            if Path(*parts[: i + 1]).exists():
                continue
            parent = Path(*parts[:i]) if i else Path(".")
            with os.scandir(parent) as entries:
                siblings = [entry.name for entry in itertools.islice(entries, PATH_HINT_ENTRIES + 1)]
            if len(siblings) > PATH_HINT_ENTRIES:
                return ""
            found = [os.path.join(parent, name, *parts[i + 1:]) if i else os.path.join(name, *parts[1:])
                     for name in near_matches(parts[i], siblings)]
            return f" Did you mean: {', '.join(found)}?" if found else ""
    except (OSError, ValueError):  # unreadable or unnamable: no hint rather than another error
        return ""
    return ""


def comma_items(text: str, what: str, noun: str = "names", *, field: str | None = None,
                required: bool = False) -> list[str]:
    """The comma-separated items of ``text``, stripped (``""``: none, or with ``required`` the error below). An empty
    item (``a,,b``, a comma at an end) is a ConfigError ``"WHAT 'a,,b': give comma-separated NOUN, none empty (item 2
    is empty)"``, never dropped: it is a typo, and a name read as ``'a,,b'`` is no better. ``what``: how the message
    names the value (a flag; with ``field``, the message writes ``{field}`` there instead, see :class:`LorakitError`)."""
    if not text.strip() and not required:
        return []
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        where = FIELD if field is not None else what
        raise ConfigError(f"{where + ' ' if where else ''}{text!r}: give comma-separated {noun}, none empty (item "
                          f"{items.index('') + 1} is empty)", field=field)
    return items


def check_names(names: Iterable[str], choices: Sequence[str], what: str) -> None:
    """ConfigError for the first of ``names`` not in ``choices``: ``unknown WHAT 'x'. Did you mean: y? Choose from
    a, b.`` (``what``: what a name picks, e.g. ``"bench perf row"``)."""
    for name in names:
        if name not in choices:
            raise ConfigError(f"unknown {what} {name!r}.{did_you_mean(name, choices)} Choose from {', '.join(choices)}.")
