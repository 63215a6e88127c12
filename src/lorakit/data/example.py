"""The one record every data source produces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Example:
    """A prompt and the completion the model should learn to emit after it.

    The loss goes on `completion` only; an EOS token is appended at tokenization time. `task` is
    an optional key (built-in task name or the JSONL `task`/`key` field) for multi-task and routed
    methods and for per-task evaluation. `routing` holds per-example vectors that routed methods read from
    the routing context's extras (e.g. RecLoRA's ``{"user_state": [...]}``); training and evaluation stack
    them per batch. Given as a mapping, it is stored as sorted ``(name, values)`` pairs (hashable, frozen).
    """

    prompt: str
    completion: str
    task: str | None = None
    routing: Mapping[str, Sequence[float]] | tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        items = self.routing.items() if isinstance(self.routing, Mapping) else self.routing
        pairs = []
        for name, values in items:
            values = (values,) if isinstance(values, (int, float)) else tuple(values)
            if not isinstance(name, str) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"Example.routing[{name!r}] must be a non-empty list of finite numbers, got {values!r}")
            pairs.append((name, tuple(float(v) for v in values)))
        object.__setattr__(self, "routing", tuple(sorted(pairs)))
