"""Named adapters on a host model: add, activate, disable, merge, delete. Free functions, no wrapper class.

The host model's classes are never edited: adapted layers are swapped for :class:`AdapterLayer` wrappers
at the same attribute path (so module names stay the same), and the adapter configs are kept on the
model object in ``model.lorakit`` (a plain attribute, not a submodule).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .delta import describe_layer, SUPPORTED_LAYERS
from .errors import AdapterError, TargetError, did_you_mean
from .inits import InitRecord, init_adapter, init_pending, requested_init, restore_base
from .layer import AdapterLayer, ModulesToSaveWrapper
from .registry import get_method
from .targeting import iter_host_modules, select_modules_to_save, select_targets

STATE_ATTR = "lorakit"


@dataclass
class AdapterState:
    """What lorakit keeps on a model: adapter configs by name and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    inits: dict[str, InitRecord] = field(default_factory=dict)  # inits run on each adapter and their base edits


def adapter_state(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = AdapterState()
        object.__setattr__(model, STATE_ATTR, state)  # not a submodule, not a parameter
    return state


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_state(model).configs)


def check_adapter(model: nn.Module, name: str) -> None:
    """Raise AdapterError (with near matches) unless ``model`` has an adapter ``name``."""
    configs = adapter_state(model).configs
    if name not in configs:
        raise AdapterError(f"unknown adapter {name!r}.{did_you_mean(name, configs)} Loaded: {list(configs)}")


def host_path(real_path: str) -> str:
    """A module's name as the user sees it: wrappers' ``base_layer`` hops removed."""
    return ".".join(c for c in real_path.split(".") if c != "base_layer")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(host path, wrapper) of every adapted layer."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield host_path(name), module


def _save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield host_path(name), module


def _resolve(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        module = getattr(module, part)
    return module


def _get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path)
    return (parent.base_layer if isinstance(parent, AdapterLayer) else parent), attr


def _adapter_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    # Half-precision bases get float32 adapters by default (as PEFT's autocast_adapter_dtype): small
    # matrices, better-conditioned updates, negligible memory.
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.is_floating_point() else torch.float32


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise AdapterError(f"invalid adapter name {name!r}: use a non-empty string without dots (and not '__base__')")


@dataclass
class AdapterPlan:
    """An adapter built but not yet attached: ``deltas[path] = (base_layer, info, delta)``, full copies for
    modules_to_save. Building first and attaching after is what makes add/load all-or-nothing."""

    name: str
    config: AdapterConfig
    deltas: dict[str, tuple[nn.Module, object, nn.Module]]
    saved: dict[str, nn.Module]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed as in the model (``<module path>.<param>``), i.e. PEFT's file keys minus the prefix."""
        out = {}
        for path, (_, _, delta) in self.deltas.items():
            for k, v in delta.state_dict().items():
                out[f"{path}.{k}"] = v
        for path, module in self.saved.items():
            for k, v in module.state_dict().items():
                out[f"{path}.{k}"] = v
        return out


def plan_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *,
                 autocast_adapter_dtype: bool = True) -> AdapterPlan:
    """Build every delta ``config`` asks for without touching the model (raises on any bad target)."""
    _check_name(name)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig (e.g. lorakit.LoraConfig), got {type(config).__name__}")
    if name in adapter_state(model).configs:
        raise AdapterError(f"adapter {name!r} already exists; delete_adapter it first or pick another name")
    method = get_method(config)
    if method.prepare is not None:
        config = method.prepare(model, config)
    targets = select_targets(model, config)
    host = dict(iter_host_modules(model))
    built = {}
    for path in targets:
        base = host[path]
        info = describe_layer(base)
        if info is None or info.kind not in method.layer_kinds:
            raise TargetError(
                f"module {path!r} ({type(base).__name__}) cannot take a {method.name!r} adapter; supported layers: "
                f"{SUPPORTED_LAYERS} (kinds {', '.join(method.layer_kinds)}). Narrow target_modules or use exclude_modules."
            )
        delta = method.build(base, info, config.for_module(path), path=path)
        # Whole blocks (an FFN for FFN-level mixtures) have no .weight: follow their first parameter.
        ref = base.weight if isinstance(getattr(base, "weight", None), torch.Tensor) else next(base.parameters())
        delta.to(device=ref.device, dtype=_adapter_dtype(ref, autocast_adapter_dtype))
        built[path] = (base, info, delta)
    saved = {path: ModulesToSaveWrapper.copy_of(host[path]) for path in select_modules_to_save(model, config)}
    return AdapterPlan(name=name, config=config, deltas=built, saved=saved)


def attach_plan(model: nn.Module, plan: AdapterPlan) -> None:
    """Attach a built plan. Cannot fail half-way: all checks happened while planning."""
    state = adapter_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, (base, info, delta) in plan.deltas.items():
        parent, attr = _get_parent(model, path)
        layer = getattr(parent, attr)
        if not isinstance(layer, AdapterLayer):
            layer = AdapterLayer(base, info).train(base.training)
            setattr(parent, attr, layer)
        layer.adapters[plan.name] = delta.train(layer.training)  # follow the host's train/eval mode
    for path, module in plan.saved.items():
        parent, attr = _get_parent(model, path)
        wrapper = getattr(parent, attr)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper).train(wrapper.training)
            setattr(parent, attr, wrapper)
        wrapper.copies[plan.name] = module.train(wrapper.training)
    state.configs[plan.name] = plan.config
    set_adapter(model, state.active or [plan.name])


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *,
                autocast_adapter_dtype: bool = True, init: str | None = None,
                init_batches: list | None = None) -> nn.Module:
    """Inject adapter ``name`` into every module ``config`` selects. Returns the same model.

    All base parameters are frozen. The first adapter added becomes active; later ones are added
    inactive (``set_adapter`` switches). Nothing is attached if any target fails.

    ``init`` names a registered init (``lorakit.list_inits()``; for LoRA the same as setting PEFT's
    ``init_lora_weights``, e.g. ``"pissa"``), run right after attaching (see ``lorakit.init_adapter``). A
    data-driven init runs on ``init_batches`` (model-input dicts) when given; without them it stays pending and
    ``lorakit.training.train`` runs it on its first batches.
    """
    if init is not None:
        config = config.with_init(init)
    attach_plan(model, plan_adapter(model, config, name, autocast_adapter_dtype=autocast_adapter_dtype))
    wanted = requested_init(model, name)
    if wanted is not None and (not wanted.needs_data or init_batches):
        init_adapter(model, name, init_batches)
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate one adapter or several (their deltas add up). Active adapters are trainable, except the
    parameters their deltas freeze (``Delta.frozen_names``) and adapters loaded for inference.
    Raises AdapterError for an unknown name (with near matches)."""
    names = [names] if isinstance(names, str) else list(names)
    state = adapter_state(model)
    for n in names:
        if n not in state.configs:
            raise AdapterError(f"unknown adapter {n!r}.{did_you_mean(n, state.configs)} Loaded: {list(state.configs)}")
    state.active = names
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for _, wrapper in _save_wrappers(model):
        wrapper.active = [n for n in names if n in wrapper.copies]
    refresh_trainable(model)


def refresh_trainable(model: nn.Module) -> None:
    """Re-apply ``requires_grad`` to every adapter parameter from the current state.

    A parameter trains iff its adapter is active, was not loaded for inference (``inference_mode``), and its
    delta does not name it in :meth:`Delta.frozen_names <lorakit.core.delta.Delta.frozen_names>`.
    ``set_adapter`` calls this; call it yourself after changing what a delta freezes (stages, gradual
    freezing). Base parameters are not touched. Raises AdapterError when a delta names a frozen parameter it
    does not have.
    """
    state = adapter_state(model)
    for path, layer in adapter_layers(model):
        for n, delta in layer.adapters.items():
            on = n in state.active and not state.configs[n].inference_mode
            frozen = set(delta.frozen_names())
            params = dict(delta.named_parameters())
            unknown = frozen - params.keys()
            if unknown:
                raise AdapterError(f"{type(delta).__name__} at {path!r} (adapter {n!r}) freezes unknown parameter(s) "
                                   f"{sorted(unknown)}; its parameters are {sorted(params)}")
            for pname, p in params.items():
                p.requires_grad_(on and pname not in frozen)
    for _, wrapper in _save_wrappers(model):
        for n, c in wrapper.copies.items():
            for p in c.parameters():
                p.requires_grad_(n in state.active and not state.configs[n].inference_mode)


def active_adapters(model: nn.Module) -> list[str]:
    return list(adapter_state(model).active)


def _unwrap(model: nn.Module, keep_copy_of: str | None = None) -> None:
    for path, layer in list(adapter_layers(model)):
        parent, attr = _get_parent(model, path)
        setattr(parent, attr, layer.base_layer)
    for path, wrapper in list(_save_wrappers(model)):
        parent, attr = _get_parent(model, path)
        module = wrapper.copies[keep_copy_of] if keep_copy_of in wrapper.copies else wrapper.original_module
        setattr(parent, attr, module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter get their plain base layer back."""
    state = adapter_state(model)
    if name not in state.configs:
        raise AdapterError(f"unknown adapter {name!r}.{did_you_mean(name, state.configs)} Loaded: {list(state.configs)}")
    for path, layer in list(adapter_layers(model)):
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged into {path!r}; unmerge_adapter before deleting it")
    restore_base(model, name)  # an init that moved part of the base into the adapter gives it back
    for path, layer in list(adapter_layers(model)):
        if name in layer.adapters:
            del layer.adapters[name]
        if len(layer.adapters) == 0:
            parent, attr = _get_parent(model, path)
            setattr(parent, attr, layer.base_layer)
    for path, wrapper in list(_save_wrappers(model)):
        if name in wrapper.copies:
            del wrapper.copies[name]
        if len(wrapper.copies) == 0:
            parent, attr = _get_parent(model, path)
            setattr(parent, attr, wrapper.original_module)
    config = state.configs.pop(name)
    _teardown(model, config, name)
    remaining = [n for n in state.active if n != name]
    set_adapter(model, remaining) if remaining else _set_no_active(model)


def _set_no_active(model: nn.Module) -> None:
    state = adapter_state(model)
    state.active = []
    for _, layer in adapter_layers(model):
        layer.active = []
    for _, w in _save_wrappers(model):
        w.active = []


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (merged adapters are unmerged, then merged back)."""
    layers = [layer for _, layer in adapter_layers(model)]
    wrappers = [w for _, w in _save_wrappers(model)]
    merged = {id(layer): (list(layer.merged), layer._original is not None) for layer in layers}
    try:
        for layer in layers:
            layer.unmerge()  # exact when merged with keep_original, else up to rounding
            layer.disabled = True
        for w in wrappers:
            w.disabled = True
        yield
    finally:
        for layer in layers:
            layer.disabled = False
            names, kept = merged[id(layer)]
            if names:
                layer.merge(names, keep_original=kept)
        for w in wrappers:
            w.disabled = False


def merge_adapter(model: nn.Module, names: list[str] | None = None, *, keep_original: bool | None = None) -> None:
    """Fold the given (default: active) adapters into the base weights; forward skips them while merged.

    Unmerging subtracts the same terms again (exact up to float rounding, ~1e-7 relative in fp32, like PEFT).
    ``keep_original=True`` keeps a copy of each merged layer's base weights so that ``unmerge_adapter``
    restores them bit for bit, at the cost of that memory while merged. The default (None) does so for
    float16/bfloat16 bases only, where arithmetic unmerging would visibly damage the base weights.
    """
    state = adapter_state(model)
    names = list(state.active) if names is None else names
    for n in names:
        if n not in state.configs:
            raise AdapterError(f"unknown adapter {n!r}.{did_you_mean(n, state.configs)}")
    for _, layer in adapter_layers(model):
        layer.merge(names, keep_original=keep_original)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _teardown(model: nn.Module, config: AdapterConfig, name: str) -> None:
    method = get_method(config)
    if method.teardown is not None:
        method.teardown(model, name)


def merge_and_unload(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Merge the (active) adapters and return the plain host model, with no lorakit layer left."""
    state = adapter_state(model)
    names = list(state.active) if names is None else names
    dropped = [n for n in state.inits if n not in names]
    if dropped:  # adapters dropped unmerged give back what their init took from the base
        unmerge_adapter(model)
        for n in dropped:
            restore_base(model, n)
    merge_adapter(model, names)
    _unwrap(model, keep_copy_of=names[0] if names else None)
    for n, config in list(state.configs.items()):
        _teardown(model, config, n)
    object.__delattr__(model, STATE_ATTR)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; returns the plain host model (base weights an init changed restored)."""
    unmerge_adapter(model)
    if hasattr(model, STATE_ATTR):
        for n in list(adapter_state(model).inits):
            restore_base(model, n)
    _unwrap(model)
    if hasattr(model, STATE_ATTR):
        for n, config in list(adapter_state(model).configs.items()):
            _teardown(model, config, n)
        object.__delattr__(model, STATE_ATTR)
    return model


def adapter_parameters(model: nn.Module, name: str, *, trainable_only: bool = False) -> dict[str, nn.Parameter]:
    """Parameters of adapter ``name`` (deltas and modules_to_save copies), by their name in the model.

    ``trainable_only=True`` leaves out what the adapter's deltas freeze (``Delta.frozen_names``), whether or
    not the adapter is active now: the parameters an optimizer for this adapter should hold.
    """
    if name not in adapter_state(model).configs:
        raise AdapterError(f"unknown adapter {name!r}; loaded: {adapter_names(model)}")
    frozen: set[int] = set()
    if trainable_only:
        for _, layer in adapter_layers(model):
            if name in layer.adapters:
                delta = layer.adapters[name]
                params = dict(delta.named_parameters())
                frozen.update(id(params[f]) for f in delta.frozen_names() if f in params)
    return {n: p for n, p in model.named_parameters()
            if (f".adapters.{name}." in n or f".copies.{name}." in n) and id(p) not in frozen}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; the base copies under modules_to_save count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    t, n = trainable_parameters(model)
    line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
    print(line)
    return line
