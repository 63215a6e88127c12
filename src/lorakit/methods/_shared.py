"""Trainable tensors shared by several deltas of one adapter (MoS's shard pools, S2-LoRA's shared A and B).

The first delta built for a group owns the group's tensors: they are registered as its parameters, so each is
trained, saved (under that module's path), cast and moved exactly once. The other deltas of the group hold the
same ``nn.Parameter`` objects in a plain dict (not registered), so optimizers, files and parameter counts see every
tensor once while every layer computes with it. The group table lives on the adapter's *prepared* config (the
method's ``prepare`` returns a fresh copy for every add/load), so two adapters never share tensors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Hashable

from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo, describe_layer
from ..core.errors import AdapterError
from ..core.model import unsupported_target
from ..core.registry import get_method
from ..core.targeting import iter_host_modules, select_targets

Layout = dict[str, tuple[Hashable, int, int]]  # module path -> (group key, index in group, group size)


def group_layout(model: nn.Module, config: AdapterConfig, key: Callable[[str, LayerInfo], Hashable]) -> Layout:
    """Group the targeted linear layers by ``key(path, info)``; each gets its index (model order) and group size."""
    host = dict(iter_host_modules(model))
    members: dict[Hashable, list[str]] = {}
    for path in select_targets(model, config):
        info = describe_layer(host[path])
        if info is None or info.kind != "linear":
            continue  # the core reports unsupported targets with its own message
        members.setdefault(key(path, info), []).append(path)
    if not members:
        first = select_targets(model, config)[0]  # (select_targets raises when nothing matches at all)
        raise unsupported_target(first, host[first], get_method(config))
    return {path: (k, i, len(paths)) for k, paths in members.items() for i, path in enumerate(paths)}


def prepare_shared(config: AdapterConfig, layout: Layout) -> AdapterConfig:
    """A copy of ``config`` carrying the layout and an empty table of shared tensors (never saved: not fields)."""
    prepared = replace(config)
    prepared._layout = layout
    prepared._shared = {}
    return prepared


def place(config: AdapterConfig, path: str) -> tuple[Hashable, int, int]:
    """(group key, index in group, group size) of module ``path``; raises AdapterError without ``prepare``."""
    layout = getattr(config, "_layout", None)
    if layout is None or path not in layout:
        raise AdapterError(f"{type(config).__name__}: layers sharing parameters are built through add_adapter/"
                           "load_adapter (which group the targeted layers first), not by calling build directly.")
    return layout[path]


def shared_params(config: AdapterConfig, key: Hashable,
                  make: Callable[[], dict[str, nn.Parameter]]) -> tuple[dict[str, nn.Parameter], bool]:
    """The group ``key``'s tensors and whether the caller is their owner (the first to ask, who registers them)."""
    table = config._shared
    if key in table:
        return table[key], False
    table[key] = make()
    return table[key], True
