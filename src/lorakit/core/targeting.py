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


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def targets_from_text(text: str, what: str) -> str | list[str]:
    """``target_modules`` written as one string (a comma-list flag, a Flower run-config value): comma-separated plain
    names (``q_proj,v_proj``) become a list (PEFT's name / suffix match); ``all-linear`` and a regex
    (``.*\\.(q|v)_proj``, ``layers\\.[0-9]{1,2}\\.q_proj``) stay one string, as ``lorakit train`` takes them. An empty
    item is ``comma_items``' ConfigError naming ``what``."""
    from .errors import comma_items

    text = text.strip()
    if text.lower() == "all-linear" or not all(_PLAIN_NAME.fullmatch(i.strip()) or not i.strip() for i in text.split(",")):
        return text
    return comma_items(text, what, "module names", required=True)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise TargetError(
        f"target_modules is not set and lorakit has no default for model type {model_type!r}; pass target_modules "
        f"(a list of module names, a regex, or 'all-linear')."
    )


def select_targets(model: nn.Module, config: AdapterConfig, *, strict: bool = True) -> list[str]:
    """Names of the modules ``config`` adapts, in model order.

    ``strict`` (names a user typed, at add time): every target_modules / exclude_modules entry, layer index,
    layers_pattern and method pattern (``config.check_patterns``) must match something, else TargetError naming
    it with near matches. Not strict (names a file carries, at load time): only "nothing matched" is an error.
    """
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

    wanted = config.layers_to_transform
    if wanted == [] and not strict:  # a file's empty list: PEFT reads it as no layer filter (check_target_module_exists)
        wanted = None
    chosen, hit_before_layer_filter, candidates, layer_ids = [], set(), [], set()
    removed: dict[str, str] = {}  # target entry -> a module it matched that exclusion removed
    for key, module in modules:
        if all_linear:
            ok = isinstance(module, linear_types) and key not in head
        else:
            ok = _matches(targets, key)
        if not ok:
            continue
        if excluded(key):
            if isinstance(targets, list):
                removed.update((t, key) for t in targets if key == t or key.endswith("." + t))
            continue
        if isinstance(targets, list):
            hit_before_layer_filter.update(t for t in targets if key == t or key.endswith("." + t))
        candidates.append(key)
        # PEFT's rule (tuners_utils.py check_target_module_exists): a module a list names in full is adapted whatever
        # layers_to_transform says; the layer filter applies to suffix matches only
        named_in_full = isinstance(targets, list) and key in targets
        if wanted is not None and not named_in_full:
            idx = layer_index(key, config.layers_pattern)
            layer_ids.add(idx)
            if idx is None or (idx != wanted if isinstance(wanted, int) else idx not in wanted):
                continue
        chosen.append(key)

    if isinstance(targets, list) and strict:
        missing = [t for t in targets if t not in hit_before_layer_filter]
        if any(t in removed for t in missing):
            t = next(t for t in missing if t in removed)
            raise TargetError(f"target_modules entry {t!r} matches modules (e.g. {removed[t]!r}), but exclude_modules="
                              f"{config.exclude_modules!r} / modules_to_save={config.modules_to_save!r} remove every one "
                              "of them (a module trained in full cannot also take an adapter); drop it from one list.")
        if missing:
            suffixes = {n.rsplit(".", 1)[-1] for n in names}
            hints = "; ".join(
                f"{t!r} (closest: {', '.join(near_matches(t, suffixes | set(names))) or 'none'})" for t in missing
            )
            raise TargetError(f"target_modules entries matched no module: {hints}.")
    if strict:
        _check_exclude(config, names)
        _check_layers(config, candidates)
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
    if strict:
        config.check_patterns(chosen)
    return chosen


def _check_exclude(config: AdapterConfig, names: list[str]) -> None:
    """An exclude_modules entry that matches no module of the model is a typo (it excludes nothing)."""
    exclude = config.exclude_modules
    entries = [exclude] if isinstance(exclude, str) else (exclude or [])
    for entry in entries:
        if not any(_matches(entry if isinstance(exclude, str) else [entry], n) for n in names):
            suffixes = {n.rsplit(".", 1)[-1] for n in names}
            found = near_matches(entry, suffixes | set(names))
            raise TargetError(f"exclude_modules entry {entry!r} matches no module of this model, so it excludes "
                              f"nothing.{' Did you mean: ' + ', '.join(found) + '?' if found else ''}")


def _check_layers(config: AdapterConfig, candidates: list[str]) -> None:
    """Every layers_to_transform index and layers_pattern name must select some of the targeted modules."""
    if config.layers_to_transform is None:
        return
    patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else (config.layers_pattern or [])
    for p in patterns:
        if not any(layer_index(k, [p]) is not None for k in candidates):
            segments = {seg for k in candidates for seg in k.split(".") if not seg.isdigit()}
            found = near_matches(p, segments)
            raise TargetError(f"layers_pattern {p!r} matches no numbered layer among the targeted modules (e.g. "
                              f"{candidates[:1]}).{' Did you mean: ' + ', '.join(found) + '?' if found else ''}")
    present = sorted({i for i in (layer_index(k, config.layers_pattern) for k in candidates) if i is not None})
    wanted = [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform
    absent = [i for i in wanted if i not in present]
    if absent:
        span = f"{present[0]}..{present[-1]} ({len(present)} layers, 0-based)" if present else "no numbered layer"
        raise TargetError(f"layers_to_transform {absent} select no targeted module: the targeted modules are in "
                          f"layers {span}.")


def select_modules_to_save(model: nn.Module, config: AdapterConfig, *, strict: bool = True) -> list[str]:
    """Modules trained in full. Not strict (a file's list, e.g. PEFT's SEQ_CLS ["classifier", "score"] of which a
    model has one): entries matching nothing are skipped."""
    wanted = config.modules_to_save or []
    found, names = [], []
    for key, _ in iter_host_modules(model):
        names.append(key)
        if any(key == m or key.endswith("." + m) for m in wanted):
            found.append(key)
    for m in wanted if strict else []:
        if not any(k == m or k.endswith("." + m) for k in found):
            raise TargetError(f"modules_to_save entry {m!r} matched no module.{' Did you mean: ' + ', '.join(near_matches(m, names)) + '?' if near_matches(m, names) else ''}")
    return found
