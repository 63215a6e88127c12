"""Data: built-in tasks, user JSONL, tokenization/collation and generation-based evaluation."""

from __future__ import annotations

import os
import random
from typing import Any

from lorakit.data.collate import (
    IGNORE_INDEX,
    CausalLMCollator,
    TokenizedDataset,
    build_task_index,
    encode_prompt,
    tokenize_example,
)
from lorakit.core.errors import comma_items
from lorakit.data.errors import DataError
from lorakit.data.evaluate import evaluate_examples, generate_completions, score_predictions
from lorakit.data.example import Example
from lorakit.data.jsonl import load_jsonl, parse_record
from lorakit.data.keys import TASK_INDEX_NAME, check_tasks, read_task_index, save_task_index
from lorakit.data.tasks import (
    ROTATE_FAMILY,
    SPLITS,
    TASKS,
    Task,
    exact_match,
    find_task,
    get_task,
    list_tasks,
    pretraining_texts,
    rotate_task,
    stable_seed,
)

__all__ = [
    "IGNORE_INDEX",
    "ROTATE_FAMILY",
    "SPLITS",
    "TASKS",
    "TASK_INDEX_NAME",
    "HOLDOUT_FRACTION",
    "CausalLMCollator",
    "DataError",
    "Example",
    "Task",
    "TokenizedDataset",
    "build_task_index",
    "check_tasks",
    "encode_prompt",
    "evaluate_examples",
    "exact_match",
    "find_task",
    "generate_completions",
    "get_task",
    "hold_out",
    "list_tasks",
    "load_examples",
    "load_jsonl",
    "parse_record",
    "pretraining_texts",
    "read_task_index",
    "rotate_task",
    "save_task_index",
    "looks_like_path",
    "score_predictions",
    "stable_seed",
    "tokenize_example",
]


def load_examples(
    spec: str | os.PathLike[str],
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> list[Example]:
    """Examples from a built-in task name, a comma-separated list of task names, or a .jsonl path.

    For tasks, `n` is the number of examples per task (required); several tasks are concatenated
    and shuffled with a seed derived from (spec, split, seed). For a file, `split` is ignored (keep
    train and test in separate files), `n` caps how many lines are read in file order (None: all, the
    default a user file should get), and `tokenizer` supplies the chat template for `messages` records.
    A spec that looks like a path (a '/' or an extension) but is no file raises `DataError` saying so.
    """
    path = os.fspath(spec)
    if os.path.isfile(path):
        return load_jsonl(path, tokenizer=tokenizer, limit=n)
    if os.path.isdir(path):
        raise DataError(f"data file {path!r} is a folder; give a JSONL file (or a built-in task name, see "
                        f"`lorakit tasks`)")
    if looks_like_path(path):
        raise DataError(f"data file {path!r} not found (a path was given; built-in task names have no '/' or '.'; "
                        f"see `lorakit tasks`)")
    # field "data": a command line words the message with its --data flag
    names = comma_items(path, "", "task names (see `lorakit tasks`)", field="data")
    if not names:
        raise ValueError(f"empty data spec {spec!r}: give a task name, comma-separated task names or a .jsonl path")
    tasks = [get_task(name) for name in names]
    if n is None:
        raise ValueError(f"n (examples per task) is required for built-in tasks, got spec {spec!r}")
    examples = [ex for task in tasks for ex in task.generate(split, n, seed)]
    if len(tasks) > 1:
        random.Random(stable_seed(",".join(names), split, seed)).shuffle(examples)
    return examples


HOLDOUT_FRACTION = 10  # a single JSONL file: the last 1/10 of its lines (at least one) are held out for evaluation


def hold_out(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """``(train, held out)``: the last ``1/HOLDOUT_FRACTION`` of ``examples`` (at least one), in file order, held out
    for evaluation when a single file is both the training and the evaluation data."""
    cut = max(1, len(examples) // HOLDOUT_FRACTION)
    return examples[:-cut], examples[-cut:]


def looks_like_path(spec: str) -> bool:
    """True for a data spec that names a file rather than built-in tasks (it has a folder or an extension)."""
    return "/" in spec or os.sep in spec or os.path.splitext(spec)[1] != ""
