"""Routing keys -> expert weights, for mixtures routed by information carried with the data (``routed_lora``,
MixDA): a per-row key (task id or name) from ``lorakit.routing(keys=...)`` selects a row of a fixed table.

Keys: integer key ``j`` is the j-th name of ``sorted(mapping)``, or, when the routing carries
``extras["task_names"]`` (training and evaluation do: their task ids are positions in the data's sorted task names,
``lorakit.data.build_task_index``, which may be a subset of the mapping's), the mapping's entry for
``task_names[j]``; a mapping must name every task of the data (an id past its names, or a task it lacks, is an
error); a string key is looked up by name; a negative key or None means "no key". Without a mapping, key j is
expert j (ids past the experts have none) and string keys are the experts' ``names``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.config import field_error
from ..core.errors import FIELD, AdapterError, ConfigError
from ..core.routing import current_routing, rows_for_batch


class KeyTable(nn.Module):
    """The routing context's per-row keys -> expert weights (batch, E). ``table`` (K+1, E): row j = key j's
    weights, the last row those of rows without a key (``default``: an expert index, -1 for none). With a
    ``mapping`` (name -> expert index or E weights) the keys are its sorted names and an integer id past them is
    an error (the data has a task the mapping lacks); without one key j is expert j and ids past the experts have
    none. Raises AdapterError for an out-of-range id or an unknown key name."""

    def __init__(self, num_experts: int, mapping: Mapping[str, int | list[float]] | None, default: int,
                 names: Sequence[str] | None):
        super().__init__()
        rows = torch.eye(num_experts)
        self.names = list(names) if names is not None else None
        if mapping is not None:
            self.names = sorted(mapping)
            rows = torch.zeros(len(self.names), num_experts)
            for j, name in enumerate(self.names):
                value = mapping[name]
                if isinstance(value, int):
                    rows[j, value] = float(value >= 0)
                else:
                    rows[j] = torch.tensor(value, dtype=torch.float32)
        none = torch.zeros(1, num_experts)
        none[0, max(default, 0)] = float(default >= 0)
        self.register_buffer("table", torch.cat([rows, none]), persistent=False)
        self.strict = mapping is not None
        self._task_maps: dict[tuple, torch.Tensor] = {}  # (task names, device) -> their positions in ``names``

    def forward(self, batch: int, device) -> torch.Tensor:
        ctx = current_routing()
        keys, n_keys = (None if ctx is None else ctx.keys), self.table.shape[0] - 1
        if keys is None:
            return self.table[n_keys].expand(batch, -1)
        if isinstance(keys, torch.Tensor):
            ids = keys.reshape(-1).to(device=device, dtype=torch.long)
        else:
            ids = torch.tensor([-1 if k is None else self._index(k) for k in keys], dtype=torch.long, device=device)
        ids = rows_for_batch(ids, batch, "keys", "key")  # generate's beams / return sequences keep their row's key
        task_names = ctx.extras.get("task_names") if self.strict else None
        given = ids
        if task_names is not None:
            ids = self._by_task_name(ids, task_names)  # an id past the task names maps to n_keys, caught below
        if self.strict and bool((ids >= n_keys).any()):  # the one host sync of a keyed forward
            if task_names is not None:
                raise AdapterError(f"routing key id {int(given.max())} is out of range: ids index the "
                                   f"{len(task_names)} task names {list(task_names)} given with them.")
            raise AdapterError(f"routing key id {int(ids.max())} is out of range: ids index the {n_keys} sorted key "
                               f"names {self.names} (the training data's sorted task names); name every task.")
        return self.table[torch.where((ids < 0) | (ids >= n_keys), torch.full_like(ids, n_keys), ids)]

    def _by_task_name(self, ids: torch.Tensor, task_names: Sequence[str]) -> torch.Tensor:
        """Ids that index ``task_names`` (the data's sorted tasks, which may be a subset of the mapping's names)
        -> ids into the mapping's sorted names; an id past ``task_names`` -> ``len(names)`` (out of range: the
        caller raises). The name -> position map is built once per (names, device), so a forward makes no new
        tensor and no host sync here. Raises AdapterError for a task the mapping does not name."""
        cache_key = (tuple(task_names), ids.device)
        to_mapping = self._task_maps.get(cache_key)
        if to_mapping is None:
            unknown = [n for n in task_names if n not in self.names]
            if unknown:
                raise AdapterError(f"task(s) {unknown} of the data have no entry in the key mapping (its keys: "
                                   f"{self.names}); map every task (-1 for none).")
            to_mapping = torch.tensor([self.names.index(n) for n in task_names] + [len(self.names)],
                                      dtype=torch.long, device=ids.device)
            self._task_maps[cache_key] = to_mapping
        return torch.where(ids >= 0, to_mapping[ids.clamp(0, len(task_names))], ids)

    def _index(self, key: Any) -> int:
        if not isinstance(key, str):
            return int(key)
        if self.names is None or key not in self.names:
            raise AdapterError(f"routing key {key!r} names no expert; known keys: {self.names or 'none (use ints)'}")
        return self.names.index(key)


def mapped_key_names(config: object) -> list[str] | None:
    """The sorted names whose positions integer keys are without ``task_names`` (a keyed config's mapping: routed_lora's
    ``key_to_expert``, MixDA's ``key_to_domain``), or None for a config without one."""
    mapping = getattr(config, "key_to_expert", None) or getattr(config, "key_to_domain", None)
    return sorted(mapping) if mapping else None


def check_mapping(cls: str, field_name: str, mapping: Mapping[str, Any] | None, n: int) -> None:
    """Raise ConfigError naming ``cls.field_name[key]`` when a mapping value is neither an expert index in
    -1..n-1 (-1: no expert) nor a list of ``n`` weights."""
    for key, value in (mapping or {}).items():
        ok = (-1 <= value < n) if isinstance(value, int) else len(value) == n
        if not ok:
            raise ConfigError(f"{FIELD}[{key!r}]={value!r}: use an expert index in 0..{n - 1}, -1 for no expert, or "
                              f"a list of {n} weights.", field=f"{cls}.{field_name}")


def check_task_experts(config: Any, field_name: str, tasks: Sequence[str], n: int,
                       names: Sequence[str] | None = None, past_experts_ok: bool = False) -> None:
    """Raise ConfigError (on ``config.field_name``, its task -> expert mapping) where training data with the sorted task
    names ``tasks`` (the loop's key ids 0..len-1) would not reach the expert a task means: a task the mapping lacks
    (its id would raise mid-run), or without a mapping, more tasks than the ``n`` experts (ids >= n train nothing)
    or tasks spelled as the experts' ``names`` in another order (id j trains expert j, not the expert so named).
    ``past_experts_ok``: ids past the experts mean something (MixDA's general-domain rows), not an error."""
    mapping = getattr(config, field_name)
    if mapping is not None:
        unknown = [t for t in tasks if t not in mapping]
        if unknown:
            raise field_error(config, field_name, f" has no entry for task(s) {unknown} of the training data (it maps "
                                                  f"{sorted(mapping)}); map every task (-1 for none).")
        return
    if len(tasks) > n and not past_experts_ok:
        raise field_error(config, field_name, f" is unset and the training data has {len(tasks)} tasks {list(tasks)} "
                                              f"for {n} experts: task ids are positions in the sorted task names, so "
                                              f"{list(tasks[n:])} would reach no expert; give "
                                              f"{len(tasks)} experts or map the tasks.")
    if names is not None and set(tasks) <= set(names) and list(tasks) != list(names)[: len(tasks)]:
        example = next(t for j, t in enumerate(tasks) if names[j] != t)
        raise field_error(config, field_name, f" is unset: task {example!r} (id {list(tasks).index(example)}, its "
                                              f"position in the sorted task names) would train expert "
                                              f"{list(tasks).index(example)} ({names[list(tasks).index(example)]!r}), "
                                              f"not the expert named {example!r}; map the tasks by name, e.g. "
                                              f"{ {t: list(names).index(t) for t in tasks} }.")
