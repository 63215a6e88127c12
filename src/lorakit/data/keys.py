"""The task -> routing key mapping an adapter was trained with, saved beside its weights.

Training numbers the data's tasks by their sorted names (``build_task_index``); keyed methods (``routed_lora``,
MeteoRA, MixDA) learn what key id j means. Evaluating a subset of the tasks would renumber them, so the mapping
is written into the adapter folder as ``task_index.json`` (``{"task_to_id": {"reverse": 0, "rotate": 1}}``) and
every consumer (``lorakit eval``, ``lorakit generate --task``, serving) reads it back instead of rebuilding it.
PEFT ignores the extra file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from lorakit.core.errors import did_you_mean
from lorakit.data.errors import DataError
from lorakit.io.files import atomic_write_json

TASK_INDEX_NAME = "task_index.json"


def save_task_index(directory: str | os.PathLike, task_to_id: Mapping[str, int]) -> Path:
    path = Path(directory) / TASK_INDEX_NAME
    atomic_write_json(path, {"task_to_id": dict(sorted(task_to_id.items(), key=lambda kv: kv[1]))})
    return path


def read_task_index(directory: str | os.PathLike) -> dict[str, int] | None:
    """The adapter's task -> key id mapping, or None when it was trained without task keys (or is a PEFT file)."""
    path = Path(directory) / TASK_INDEX_NAME
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text())["task_to_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a task index ({e}); expected {{\"task_to_id\": {{name: id}}}}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in mapping.items()):
        raise DataError(f"{path}: task_to_id must map task names to integer ids")
    return mapping


def keyless_rows_get_base(config: object) -> bool:
    """Whether rows without a task key would silently get the base model's answer under this adapter config (a
    keyed method, e.g. routed_lora, whose ``default_expert`` is -1). CLI and server refuse such rows; one rule."""
    return getattr(config, "default_expert", None) == -1


def check_tasks(task_to_id: Mapping[str, int], tasks: Iterable[str | None], source: str) -> None:
    """Raise DataError naming the first task the adapter does not know (None: a row without a key is fine)."""
    for task in tasks:
        if task is not None and task not in task_to_id:
            raise DataError(f"task {task!r} ({source}) is not one this adapter was trained with; known tasks: "
                            f"{', '.join(sorted(task_to_id))}.{did_you_mean(task, task_to_id)}")
