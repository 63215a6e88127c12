"""Pretraining corpus: Python standard-library source mixed with the built-in tasks' pretraining split.

Both halves exist offline on any Python install, so the bundled base model can be rebuilt anywhere. The
stdlib half gives the model general text and code statistics; the task half teaches it the task formats
("prompt => completion"), so that fine-tuning starts from a model that answers in the right shape and the
task metrics have room to move.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.core.config import check_non_negative, check_positive, check_range, field_error

# Directory names never read: tests, third-party code, GUI demos, and data-like packages whose "source"
# is mostly tables (encodings) or vendored wheels (ensurepip).
SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "turtledemo", "ensurepip",
    "encodings", "lib-dynload", "__pycache__", "__phello__",
})
SKIPPED_PREFIXES = ("test_", "config-", "_sysconfigdata")

TaskTextsFn = Callable[[int, int], list[str]]


@dataclass
class CorpusConfig:
    """What the pretraining corpus is made of.

    ``task_fraction`` is the share of the corpus's characters that come from the tasks' pretraining split;
    the rest is ``stdlib_chars`` characters of standard-library source in chunks of about ``chunk_chars``.
    """

    task_fraction: float = field(default=0.5, metadata={"help": "share of the corpus's characters from the tasks' "
                                                                "pretraining split"})
    stdlib_chars: int = field(default=3_000_000, metadata={"help": "characters of standard-library source"})
    chunk_chars: int = field(default=1_024, metadata={"help": "characters per stdlib chunk"})
    seed: int = field(default=0, metadata={"help": "seed of the corpus's stdlib sampling"})

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        check_range(self, "task_fraction", 0, 1, high_open=True,
                    note=" (the share of task text, the rest being stdlib source)")
        check_positive(self, "stdlib_chars")
        if self.chunk_chars < 64:
            raise field_error(self, "chunk_chars", f" must be >= 64, got {self.chunk_chars}.")

    @property
    def task_chars(self) -> int:
        """Characters of task text that give ``task_fraction`` of the whole corpus."""
        return round(self.stdlib_chars * self.task_fraction / (1.0 - self.task_fraction))


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, without tests and vendored code.

    Skipped directories are pruned from the walk, not listed and filtered, so ``test/`` and ``site-packages/``
    cost nothing."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skipped = lambda name: name in SKIPPED_DIRS or name.startswith(SKIPPED_PREFIXES)  # noqa: E731
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not skipped(d)]
        found.extend(Path(folder, n) for n in names if n.endswith(".py") and not skipped(n))
    return sorted(found)


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """Split at line ends into pieces of about ``chunk_chars``; a longer single line is kept whole."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > chunk_chars and current:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return [c for c in (c.strip("\n") for c in chunks) if c.strip()]


def stdlib_texts(n_chars: int, chunk_chars: int = 1_024, seed: int = 0, root: str | Path | None = None) -> list[str]:
    """About ``n_chars`` characters of stdlib source, as chunks drawn from all modules in a seeded order.

    Every module is read and cut into chunks before the seeded shuffle, so the texts for a given budget and seed
    are the ones every committed pretraining result (the bundled base's recipe, benchmarks/regmix, mixln,
    mixture_inference) was built from; reading only the chunks a budget takes would change them. The read is a few
    seconds, small next to the rest of a corpus build."""
    chunks = []
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.extend(split_chunks(text, chunk_chars))
    # Shuffle before taking a prefix so a small budget still sees many modules, not the first few alphabetically.
    random.Random(seed).shuffle(chunks)
    return take_chars(chunks, n_chars)


def take_chars(texts: list[str], n_chars: int) -> list[str]:
    """The shortest prefix of ``texts`` holding at least ``n_chars`` characters (all of them if there are fewer)."""
    taken, total = [], 0
    for text in texts:
        if total >= n_chars:
            break
        taken.append(text)
        total += len(text)
    return taken


def _default_task_texts() -> TaskTextsFn:
    from lorakit.data.tasks import pretraining_texts

    return pretraining_texts


def task_texts(n_chars: int, seed: int = 0, source: TaskTextsFn | None = None) -> list[str]:
    """About ``n_chars`` characters of task examples, balanced across tasks.

    ``source(n_per_task, seed)`` is ``lorakit.data.tasks.pretraining_texts`` unless given; a small probe
    measures how long examples are, so the per-task count can hit the character budget.
    """
    if n_chars <= 0:
        return []
    source = source or _default_task_texts()
    probe_n = 32
    probe = source(probe_n, seed)
    if not probe:
        return []
    n_tasks = max(1, round(len(probe) / probe_n))
    mean_chars = sum(map(len, probe)) / len(probe)
    n_per_task = max(1, -(-n_chars // round(mean_chars * n_tasks)))
    return source(n_per_task, seed)


@dataclass
class Corpus:
    """Documents to pretrain on: one string each, trained as ``<s> text </s>``."""

    documents: list[str]
    n_stdlib: int
    n_task: int

    def stats(self) -> dict:
        stdlib_chars = sum(map(len, self.documents[: self.n_stdlib]))
        task_chars = sum(map(len, self.documents[self.n_stdlib:]))
        return {
            "stdlib_documents": self.n_stdlib, "stdlib_chars": stdlib_chars,
            "task_documents": self.n_task, "task_chars": task_chars,
            "task_char_fraction": round(task_chars / max(1, stdlib_chars + task_chars), 4),
        }


def build_corpus(config: CorpusConfig, task_source: TaskTextsFn | None = None) -> Corpus:
    """Stdlib chunks followed by task examples; the trainer shuffles, so order here carries no meaning."""
    stdlib = stdlib_texts(config.stdlib_chars, config.chunk_chars, config.seed)
    tasks = task_texts(config.task_chars, config.seed, task_source) if config.task_fraction > 0 else []
    return Corpus(stdlib + tasks, n_stdlib=len(stdlib), n_task=len(tasks))
