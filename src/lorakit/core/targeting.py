"""Which modules an adapter config selects (PEFT's conventions, with errors that name near matches)."""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from .config import AdapterConfig
from .delta import Conv1D
from .errors import TargetError, near_matches
from .layer import AdapterLayer, ModulesToSaveWrapper

# Used when target_modules is None, keyed by transformers' config.model_type (as PEFT's defaults).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "bart": ["q_proj", "v_proj"], "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}


def iter_host_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) over the host model as the user sees it: adapter wrappers stand for their base layer."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, AdapterLayer):
            yield full, child.base_layer
            yield from iter_host_modules(child.base_layer, full)  # an adapted block's inner layers stay targetable
        elif isinstance(child, ModulesToSaveWrapper):
            yield full, child.original_module
        else:
            yield full, child
            yield from iter_host_modules(child, full)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, AdapterLayer):
        head = head.base_layer
    return {n for n, m in iter_host_modules(model) if head is not None and m is head}


def _matches(pattern: list[str] | str, key: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return any(key == t or key.endswith("." + t) for t in pattern)


def layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    # The first numbered segment, not the last (MoE keys like "layers.1.experts.0..." would pick the expert).
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key) or re.match(r"^[^.]*\.(\d+)\.", key)
        return int(m.group(1)) if m else None
    for p in patterns:
        m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise TargetError(
        f"target_modules is not set and lorakit has no default for model type {model_type!r}; pass target_modules "
        f"(a list of module names, a regex, or 'all-linear')."
    )


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` adapts, in model order. Raises TargetError when a pattern matches nothing."""
    modules = list(iter_host_modules(model))
    names = [n for n, _ in modules]
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    save = config.modules_to_save or []

    def excluded(key: str) -> bool:
        if config.exclude_modules is not None and _matches(config.exclude_modules, key):
            return True
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in save)

    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    head = _output_head_names(model) if all_linear else set()
    linear_types = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

    chosen, hit_before_layer_filter, layer_ids = [], set(), set()
    for key, module in modules:
        if all_linear:
            ok = isinstance(module, linear_types) and key not in head
        else:
            ok = _matches(targets, key)
        if not ok or excluded(key):
            continue
        if isinstance(targets, list):
            hit_before_layer_filter.update(t for t in targets if key == t or key.endswith("." + t))
        if config.layers_to_transform is not None:
            idx = layer_index(key, config.layers_pattern)
            layer_ids.add(idx)
            wanted = config.layers_to_transform
            if idx is None or (idx != wanted if isinstance(wanted, int) else idx not in wanted):
                continue
        chosen.append(key)

    if isinstance(targets, list):
        missing = [t for t in targets if t not in hit_before_layer_filter]
        if missing:
            suffixes = {n.rsplit(".", 1)[-1] for n in names}
            hints = "; ".join(
                f"{t!r} (closest: {', '.join(near_matches(t, suffixes | set(names))) or 'none'})" for t in missing
            )
            raise TargetError(f"target_modules entries matched no module: {hints}.")
    if not chosen and layer_ids - {None}:
        found = sorted(layer_ids - {None})
        raise TargetError(
            f"layers_to_transform={config.layers_to_transform!r} selects no layer: the modules target_modules="
            f"{targets!r} matches are in layers {found[0]}..{found[-1]} ({len(found)} layers, 0-based)."
        )
    if not chosen:
        shown = ", ".join(sorted({n.rsplit('.', 1)[-1] for n, m in modules if not list(m.children())})[:20])
        raise TargetError(
            f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}) matched no module. Leaf module names in this "
            f"model include: {shown}."
        )
    return chosen


def select_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    wanted = config.modules_to_save or []
    found, names = [], []
    for key, _ in iter_host_modules(model):
        names.append(key)
        if any(key == m or key.endswith("." + m) for m in wanted):
            found.append(key)
    for m in wanted:
        if not any(k == m or k.endswith("." + m) for k in found):
            raise TargetError(f"modules_to_save entry {m!r} matched no module.{' Did you mean: ' + ', '.join(near_matches(m, names)) + '?' if near_matches(m, names) else ''}")
    return found
