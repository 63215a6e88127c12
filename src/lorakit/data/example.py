"""The one record every data source produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt and the completion the model should learn to emit after it.

    The loss goes on `completion` only; an EOS token is appended at tokenization time. `task` is
    an optional key (built-in task name or the JSONL `task`/`key` field) for multi-task and routed
    methods and for per-task evaluation.
    """

    prompt: str
    completion: str
    task: str | None = None
