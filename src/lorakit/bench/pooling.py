"""What ``bench methods --combine`` and ``bench mixtures --combine`` check before pooling saved results: each file
is a result of that bench, and every later file was run with the first one's settings on the same untrained model
(otherwise its rows or seeds would not be comparable)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..core.errors import ConfigError


def plain(value: Any) -> Any:
    """A profile value as JSON reads it back (tuples become lists), for comparing a result with a saved one."""
    return list(value) if isinstance(value, tuple) else value


def check_poolable(results: Sequence[dict], names: Sequence[str] | None, *, bench: str, is_result: Callable[[dict], bool],
                   needs: str, keys: Sequence[str], differ: str, why: str, also_has: Sequence[str] = (),
                   score: Callable[[Any], Any] = lambda before: before) -> list[str]:
    """The files' names (``names``, else each result's command or ``result i``), after checking ``results``:

    - at least one; each passes ``is_result`` (else "not a `bench BENCH` result (no NEEDS)") and its profile has
      every key of ``keys`` and ``also_has`` (keys that may differ between files, e.g. ``seeds``);
    - every later file's profile equals the first's in ``keys`` ("WHERE: DIFFER from FIRST's in {key: (first,
      this)}: WHY") and its untrained score (``score(result["before"])``) is the first's.

    Raises ConfigError naming the file.
    """
    if not results:
        raise ConfigError("combine needs at least one result file")
    names = list(names) if names else [r.get("command") or f"result {i + 1}" for i, r in enumerate(results)]
    for where, r in zip(names, results):
        if not isinstance(r.get("profile"), dict) or "before" not in r or not is_result(r):
            raise ConfigError(f"{where}: not a `bench {bench}` result (no {needs})")
        missing = [k for k in (*keys, *also_has) if k not in r["profile"]]
        if missing:
            raise ConfigError(f"{where}: its profile lacks {missing}: not a `bench {bench}` result")
    first = results[0]
    for where, r in zip(names[1:], results[1:]):
        changed = {k: (first["profile"][k], r["profile"][k]) for k in keys
                   if plain(r["profile"][k]) != plain(first["profile"][k])}
        if changed:
            raise ConfigError(f"{where}: {differ} from {names[0]}'s in {changed} (first, this): {why}")
        if r["before"] != first["before"]:
            raise ConfigError(f"{where}: the untrained model scores {score(r['before'])} there, "
                              f"{score(first['before'])} in {names[0]}: another base model or evaluation set")
    return names
