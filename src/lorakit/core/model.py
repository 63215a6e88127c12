"""Named adapters on a host model: add, activate, disable, merge, delete. Free functions, no wrapper class.

The host model's classes are never edited: adapted layers are swapped for :class:`AdapterLayer` wrappers
at the same attribute path (so module names stay the same), and the adapter configs are kept on the
model object in ``model.lorakit`` (a plain attribute, not a submodule).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import AdapterConfig
from .delta import SUPPORTED_LAYERS, Delta, LayerInfo, describe_kinds, describe_layer, values_from_file
from .errors import FIELD, AdapterError, ConfigError, TargetError, UnknownAdapterError, did_you_mean
from .inits import InitRecord, check_float_base, check_init_config, init_adapter, init_options, restore_base
from .layer import AdapterLayer, ModulesToSaveWrapper
from .registry import get_method
from .routing import check_adapter_names, current_routing
from .targeting import iter_host_modules, select_modules_to_save, select_targets

STATE_ATTR = "lorakit"


@dataclass
class AdapterState:
    """What lorakit keeps on a model: adapter configs by name and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: int = 0  # depth of nested disable_adapters blocks
    hook_id: int | None = None  # id of the forward pre-hook that checks routing names before any compute
    inits: dict[str, InitRecord] = field(default_factory=dict)  # inits run on each adapter and their base edits


def adapter_state(model: nn.Module) -> AdapterState:
    """The :class:`AdapterState` kept on ``model`` (made on first use). AdapterError when ``model`` is not a
    torch module (a model's name or path given where the loaded model goes)."""
    if not isinstance(model, nn.Module):
        hint = (f" (load it first, e.g. AutoModelForCausalLM.from_pretrained({model!r}))"
                if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else "")
        raise AdapterError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
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
        raise UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, configs)} Loaded: {list(configs)}")


def adapter_list(model: nn.Module, names: str | Iterable[str], what: str) -> list[str]:
    """``names`` (one adapter name, or a list / tuple of names) as a list of adapters of ``model``, checked before
    anything changes: an entry that is not a str, or one named twice (its delta would be added twice: twice the
    update), is an AdapterError, an unknown name an UnknownAdapterError with near matches. ``what`` names the call
    in the message (``"set_adapter"``). A string is one name, never its characters."""
    if isinstance(names, str):
        names = [names]
    elif not isinstance(names, (list, tuple)):
        raise AdapterError(f"{what} takes an adapter name or a list of names, got {names!r} "
                           f"({type(names).__name__}). Loaded: {adapter_names(model)}")
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise AdapterError(f"{what}: adapter names are strings, got {n!r} ({type(n).__name__}) in {names!r}. "
                               f"Loaded: {adapter_names(model)}")
        check_adapter(model, n)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdapterError(f"{what}: {repeated} named more than once in {names!r}; each adapter counts once (name "
                           f"it once; to scale an adapter use lorakit.merge_adapters with weights).")
    return names


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


def _walk(model: nn.Module) -> tuple[list[tuple[str, AdapterLayer]], list[tuple[str, ModulesToSaveWrapper]]]:
    """``(adapter_layers(model), _save_wrappers(model))`` as lists, from one pass over the model's modules. A public
    call walks the model once with this and hands the lists to its helpers (each walk visits every delta's
    submodules too, so re-walking per helper made one call cost several walks); nothing is kept between calls."""
    layers, wrappers = [], []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            layers.append((host_path(name), module))
        elif isinstance(module, ModulesToSaveWrapper):
            wrappers.append((host_path(name), module))
    return layers, wrappers


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


def adapter_placement(base: nn.Module, autocast: bool = True) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the adapter tensors on ``base``: its weight's device; its dtype, except that half-precision
    bases get float32 adapters by default (as PEFT's autocast_adapter_dtype: small matrices, better-conditioned
    updates, negligible memory). Whole blocks (an FFN for FFN-level mixtures) have no .weight: their first parameter."""
    ref = base.weight if isinstance(getattr(base, "weight", None), torch.Tensor) else next(base.parameters())
    if autocast and ref.dtype in (torch.float16, torch.bfloat16):
        return ref.device, torch.float32
    return ref.device, (ref.dtype if ref.is_floating_point() else torch.float32)


def _check_name(name: str) -> None:
    """Adapter names key ``nn.ModuleDict`` s in every adapted layer, so besides being non-empty, dot-free strings
    they cannot be a ModuleDict attribute (``eval``, ``train``, ``to``, ``keys``...). Raises AdapterError."""
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise AdapterError(f"invalid adapter name {name!r}: use a non-empty string without dots (and not '__base__')")
    if hasattr(nn.ModuleDict(), name) or name.startswith("_"):  # an instance: also ``training`` and the like
        raise AdapterError(f"invalid adapter name {name!r}: it is the name of a torch.nn.Module attribute (or starts "
                           f"with '_'), which a layer's adapter table cannot hold; pick another, e.g. {name + '_adapter'!r}")


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


def unsupported_target(path: str, module: nn.Module, method) -> TargetError:
    """The error for a target ``module`` the registered ``method`` cannot adapt: it names the module, its type,
    the method and the layer types the method adapts."""
    info = describe_layer(module)
    kind = "a layer type lorakit does not adapt" if info is None else f"layer kind {info.kind!r}"
    return TargetError(
        f"module {path!r} ({type(module).__name__}, {kind}) cannot take a {method.name!r} adapter: {method.name!r} "
        f"adapts {describe_kinds(method.layer_kinds)} (layer kinds {', '.join(method.layer_kinds)}; all the layers "
        f"lorakit adapts: {SUPPORTED_LAYERS}). Narrow target_modules or use exclude_modules.")


def plan_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *,
                 autocast_adapter_dtype: bool = True, trained: set[str] | None = None) -> AdapterPlan:
    """Build every delta ``config`` asks for without touching the model (raises on any bad target).

    ``trained`` (loading a file): the module paths the file has tensors for. Its name lists are then read
    leniently — entries matching nothing in this model are skipped, and modules_to_save are those the file
    holds — while names a user types (``trained=None``) must each match.
    """
    _check_new(model, config, name)
    with temporarily_unmerged(model):  # inits that read base weights must see the base, not a merged adapter
        return _plan(model, config, name, autocast_adapter_dtype, trained)


def plan_targets(model: nn.Module, config: AdapterConfig, name: str = "default") -> list[tuple[str, nn.Module, LayerInfo]]:
    """``(path, base layer, LayerInfo)`` of every module ``config`` would adapt, with every check that
    ``plan_adapter`` makes before it builds anything (name, targets, layer kinds); nothing is built or changed.
    ``add_adapter`` uses it to run an init's data pass on the base model before the adapter exists."""
    _check_new(model, config, name)
    with temporarily_unmerged(model):
        return _targets(model, config, get_method(config), strict=True)[1]


def planned_shapes(model: nn.Module, config: AdapterConfig, name: str, trained: set[str]
                   ) -> tuple[AdapterConfig, dict[str, dict[str, tuple[int, ...]]], dict[str, dict[str, tuple[int, ...]]]]:
    """What ``plan_adapter(model, config, name, trained=trained)`` would build, as shapes only: ``(config after the
    method's prepare, {delta path: {key: shape}}, {modules_to_save path: {key: shape}})``. The deltas are built on
    the meta device, so nothing is allocated: a loader checks a file's tensors against these before a config's
    sizes (an edited ``r=100000000``) reach memory. Raises what planning raises (AdapterError for the name,
    TargetError, ConfigError), and whatever a method's build raises on the meta device."""
    _check_new(model, config, name)
    with temporarily_unmerged(model):
        meta = meta_plan(model, config, name, trained)
    return meta.config, meta.delta_shapes(), meta.saved_shapes(model)


@dataclass
class MetaPlan:
    """An adapter for a file, built on the meta device (nothing allocated): ``deltas[path] = (base_layer, info,
    delta)`` as in :class:`AdapterPlan`, ``saved``: the modules_to_save paths the file holds. Its shapes are checked
    against the file first; :func:`materialise` then makes the adapter from it and the file's values, without
    building it again."""

    name: str
    config: AdapterConfig  # after the method's prepare
    deltas: dict[str, tuple[nn.Module, LayerInfo, nn.Module]]
    saved: list[str]

    def delta_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {path: {key: tuple(value.shape) for key, value in delta.state_dict().items()}
                for path, (_, _, delta) in self.deltas.items()}

    def saved_shapes(self, model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
        host = dict(iter_host_modules(model))
        return {path: {key: tuple(value.shape) for key, value in host[path].state_dict().items()}
                for path in self.saved}


def meta_plan(model: nn.Module, config: AdapterConfig, name: str, trained: set[str]) -> MetaPlan:
    """Every delta ``config`` asks for on ``model``, built on the meta device from a file's point of view
    (``trained``: the module paths the file holds; names read leniently, deltas built under
    :func:`~lorakit.core.delta.values_from_file`). The caller has checked the name (``_check_new``) and unmerged
    the model (``temporarily_unmerged``). Raises what planning raises (TargetError, ConfigError)."""
    method = get_method(config)
    config, targets = _targets(model, config, method, strict=False)
    with torch.device("meta"), values_from_file():
        deltas = {path: (base, info, method.build(base, info, config.for_module(path), path=path))
                  for path, base, info in targets}
        deltas.update(config.extra_deltas(model, [path for path, _, _ in targets]))
    saved = [path for path in select_modules_to_save(model, config, strict=False) if path in trained]
    return MetaPlan(name=name, config=config, deltas=deltas, saved=saved)


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` holds a tensor, also inside a module kept outside the registered submodules (a frozen
    projection held by ``object.__setattr__``, a router shared through the config): built on the meta device,
    such a module would keep meta tensors, since :func:`materialise` gives values to registered tensors only."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, nn.Module):
        return any(True for _ in value.parameters()) or any(True for _ in value.buffers())
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_tensor(v) for v in value)
    return False


def _tensors_only_registered(delta: nn.Module) -> bool:
    """Whether every tensor of ``delta`` is a registered parameter or buffer under one name (so replacing those
    replaces all of its state): no tensor in another attribute (a shared group's dict, a cached projection), none
    registered twice (a tie)."""
    for module in delta.modules():
        hidden = {k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
        if _holds_tensor(hidden):
            return False
    named = list(delta.named_parameters(remove_duplicate=False)) + list(delta.named_buffers(remove_duplicate=False))
    return len({id(t) for _, t in named}) == len(named)


def materialise(model: nn.Module, meta: MetaPlan, given: Mapping[str, torch.Tensor], *,
                autocast_adapter_dtype: bool = True) -> AdapterPlan | None:
    """The :class:`AdapterPlan` of ``meta`` with every delta tensor a copy of the file's value ``given[path.key]``
    (placed as ``plan_adapter`` places it: the base layer's device, dtype ``adapter_placement``), or None when some
    delta has state the file does not give (a buffer it leaves out, a tensor a method regenerates, one held outside
    the registered parameters, a prepared config holding tensors): the caller then builds the adapter for real. So
    a file's adapter is built once (on the meta device, for the shape checks) instead of twice."""
    if _holds_tensor(vars(meta.config)):
        return None
    for path, (_, _, delta) in meta.deltas.items():
        names = [k for k, _ in delta.named_parameters()] + [k for k, _ in delta.named_buffers()]
        if not _tensors_only_registered(delta) or any(f"{path}.{k}" not in given for k in names):
            return None
    _warn_tied_targets(model, meta.deltas)
    built = {}
    for path, (base, info, delta) in meta.deltas.items():
        device, dtype = adapter_placement(base, autocast_adapter_dtype)
        for prefix, module in delta.named_modules():
            for table in (module._parameters, module._buffers):
                for key, old in list(table.items()):
                    if old is None:
                        continue
                    value = given[".".join(filter(None, (path, prefix, key)))]
                    value = value.to(device=device, dtype=dtype if old.is_floating_point() else old.dtype, copy=True)
                    table[key] = (nn.Parameter(value, requires_grad=old.requires_grad)
                                  if isinstance(old, nn.Parameter) else value)
        built[path] = (base, info, delta)
    host = dict(iter_host_modules(model))
    saved = {path: ModulesToSaveWrapper.copy_of(host[path]) for path in meta.saved}
    return AdapterPlan(name=meta.name, config=meta.config, deltas=built, saved=saved)


def _warn_tied_targets(model: nn.Module, deltas: Mapping[str, tuple[nn.Module, Any, Any]]) -> None:
    """Warn for each target whose weight another module shares (tied embeddings): training changes only it."""
    twins = tied_parameters(model)
    for path, (base, _, _) in deltas.items():
        shared = twins.get(id(getattr(base, "weight", None)), [])
        others = [n for n in shared if n.rpartition(".")[0] != path]
        if others:
            warnings.warn(f"target {path!r} shares its weight with {others} (tied weights): training changes only "
                          f"{path!r}, and merging will untie them (the merged {path!r} gets its own weight)",
                          stacklevel=5)


def _check_config(config: AdapterConfig) -> None:
    """ConfigError unless ``config`` is an adapter config (a dict of PEFT's fields says how to make one)."""
    if not isinstance(config, AdapterConfig):
        hint = (" (a dict of fields: lorakit.LoraConfig(**fields), or lorakit.get_method(name).config_cls(**fields))"
                if isinstance(config, Mapping) else "")
        raise ConfigError(f"config must be an AdapterConfig such as lorakit.LoraConfig(r=16), got "
                          f"{type(config).__name__}{hint}")


def _check_new(model: nn.Module, config: AdapterConfig, name: str) -> None:
    _check_name(name)
    _check_config(config)
    if name in adapter_state(model).configs:
        raise AdapterError(f"adapter {name!r} already exists; delete_adapter it first or pick another name")


def _targets(model: nn.Module, config: AdapterConfig, method, strict: bool
             ) -> tuple[AdapterConfig, list[tuple[str, nn.Module, LayerInfo]]]:
    """The config after ``method.prepare`` and its checked targets (TargetError for a layer kind it cannot adapt)."""
    if method.prepare is not None:
        config = method.prepare(model, config)
    host = dict(iter_host_modules(model))
    out = []
    for path in select_targets(model, config, strict=strict):
        base = host[path]
        info = describe_layer(base)
        if info is None or info.kind not in method.layer_kinds:
            raise unsupported_target(path, base, method)
        out.append((path, base, info))
    return config, out


def _plan(model: nn.Module, config: AdapterConfig, name: str, autocast_adapter_dtype: bool,
          trained: set[str] | None) -> AdapterPlan:
    method = get_method(config)
    config, targets = _targets(model, config, method, strict=trained is None)
    host = dict(iter_host_modules(model))
    _warn_tied_targets(model, {path: (base, info, None) for path, base, info in targets})
    if trained is None:  # sizes a user typed (a file's tensors were already read: their size is what it is)
        _check_adapter_size(model, config, targets)
    built = {}
    for path, base, info in targets:
        delta = method.build(base, info, config.for_module(path), path=path)
        device, dtype = adapter_placement(base, autocast_adapter_dtype)
        delta.to(device=device, dtype=dtype)
        built[path] = (base, info, delta)
    for path, (base, info, delta) in config.extra_deltas(model, [path for path, _, _ in targets]).items():
        device, dtype = adapter_placement(base, autocast_adapter_dtype)
        built[path] = (base, info, delta.to(device=device, dtype=dtype))
    to_save = select_modules_to_save(model, config, strict=trained is None)
    if trained is not None:
        to_save = [p for p in to_save if p in trained]
    saved = {path: ModulesToSaveWrapper.copy_of(host[path]) for path in to_save}
    return AdapterPlan(name=name, config=config, deltas=built, saved=saved)


# A rank-r adapter may hold at most this many times the base model's own parameter count. PEFT accepts
# r > min(in, out), and a full-rank LoRA on every linear layer is about 2x those layers (r (in + out) against
# in * out), so 10x leaves room for any rank that still means something, and refuses the r=100000 that got the
# process killed for memory.
MAX_ADAPTER_TO_BASE = 10


def _check_adapter_size(model: nn.Module, config: AdapterConfig, targets: list[tuple[str, nn.Module, LayerInfo]]
                        ) -> None:
    """ConfigError naming ``r``, before any adapter tensor is allocated, when a config's rank ``r`` asks for more
    than ``MAX_ADAPTER_TO_BASE`` times the base model's parameters, counted as LoRA's factors, A (r x in) and B
    (out x r), on every target: r * (in_features + out_features) per module (Hu et al. 2021, arXiv:2106.09685).
    The message names the largest module's shape and count. Not built (a method's build may share tensors across
    modules or read the base), so methods that share their factors (VeRA) are counted as LoRA is."""
    r = getattr(config, "r", None)
    if not isinstance(r, int) or isinstance(r, bool) or not targets:
        return
    sizes = {path: (info, r * (info.in_features + info.out_features)) for path, _, info in targets}
    total = sum(n for _, n in sizes.values())
    base = sum(p.numel() for p in model.parameters())
    if total <= MAX_ADAPTER_TO_BASE * base:
        return
    path, (info, largest) = max(sizes.items(), key=lambda kv: kv[1][1])
    full = min(info.in_features, info.out_features)
    raise ConfigError(f"{FIELD}={r} asks for {total:,} adapter parameters (r * (in_features + out_features) on each "
                      f"of {len(sizes)} modules), {total / base:,.0f}x the base model's {base:,}; lorakit refuses more "
                      f"than {MAX_ADAPTER_TO_BASE}x, which would only exhaust memory. Its largest module {path!r} "
                      f"({info.kind}, in_features={info.in_features}, out_features={info.out_features}) alone gets "
                      f"{largest:,}. Lower {FIELD}: a full-rank update of that module needs r = min(in_features, "
                      f"out_features) = {full}.", field=f"{type(config).__name__}.r")


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
            layer.disabled = state.disabled > 0  # added inside a disable_adapters block
            setattr(parent, attr, layer)
        layer.adapters[plan.name] = delta.train(layer.training)  # follow the host's train/eval mode
        layer.known = state.configs
    for path, module in plan.saved.items():
        parent, attr = _get_parent(model, path)
        wrapper = getattr(parent, attr)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper).train(wrapper.training)
            wrapper.disabled = state.disabled > 0
            setattr(parent, attr, wrapper)
        wrapper.copies[plan.name] = module.train(wrapper.training)
        wrapper.known = state.configs
    state.configs[plan.name] = plan.config
    if state.hook_id is None:
        state.hook_id = model.register_forward_pre_hook(_check_routing_names, prepend=True).id  # before any other
    set_adapter(model, state.active or [plan.name])


def _check_routing_names(model: nn.Module, args) -> None:
    """Unknown adapter names in a routing block fail at the model's forward, before any layer runs."""
    state = getattr(model, STATE_ATTR, None)
    ctx = current_routing()
    if state is not None and ctx is not None:
        check_adapter_names(ctx, state.configs)
        if ctx.adapter_ids is not None and getattr(model, "lorakit_bank", None) is None:
            raise AdapterError("routing(adapter_ids=...) needs adapters loaded into banks (lorakit.serving."
                               "load_adapters / bank_adapters); for attached adapters use routing(adapter_names=...)")


def _forget(model: nn.Module) -> None:
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        if state.hook_id is not None:  # by id, not by handle: a deep copy's handle would point at the original
            model._forward_pre_hooks.pop(state.hook_id, None)
        object.__delattr__(model, STATE_ATTR)


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *,
                autocast_adapter_dtype: bool = True, init: str | None = None,
                init_batches: list | None = None) -> nn.Module:
    """Inject adapter ``name`` into every module ``config`` selects. Returns the same model.

    All base parameters are frozen. The first adapter added becomes active; later ones are added
    inactive (``set_adapter`` switches). Nothing is attached if any target fails.

    ``init`` names a registered init (``lorakit.list_inits()``; for LoRA the same as setting PEFT's
    ``init_lora_weights``, e.g. ``"pissa"``; a value of the method's own start such as ``"gaussian"`` or True is a
    ConfigError naming the config field that takes it, as ``lorakit train --init`` refuses it), run right after
    attaching (see ``lorakit.init_adapter``). A
    data-driven init runs on ``init_batches`` (model-input dicts) when given; without them it stays pending and
    ``lorakit.training.train`` runs it on its first batches. An init with a data pass on the base model alone
    (``Init.estimate``, e.g. LoRA-GA's gradients) runs that pass first, before the adapter's tensors exist (as
    PEFT's ``preprocess_loraga`` before ``get_peft_model``); if the pass or the init fails, nothing is attached.
    """
    _check_config(config)
    if init is not None:
        check_init_config(init, config)  # a registered init ("gaussian" is LoraConfig's own: said so, not applied)
        config = config.with_init(init)
    spec = config.requested_init()
    wanted = None if spec is None else check_init_config(spec, config)  # before any target or data pass
    if wanted is None or (wanted.needs_data and not init_batches):
        attach_plan(model, plan_adapter(model, config, name, autocast_adapter_dtype=autocast_adapter_dtype))
        return model
    init_batches = None if init_batches is None else list(init_batches)
    options = {}
    wanted.check_options(init_options(model, name))
    if wanted.estimate is not None:
        targets = plan_targets(model, config, name)  # every check first: a failed plan wastes no data pass
        if wanted.changes_base:
            check_float_base(wanted.name, ((path, base) for path, base, info in targets if info.kind == "linear"))
        with torch.no_grad():
            options["estimate"] = wanted.estimate(model, targets, init_batches, spec, **init_options(model, name))
    attach_plan(model, plan_adapter(model, config, name, autocast_adapter_dtype=autocast_adapter_dtype))
    try:
        init_adapter(model, name, init_batches, **options)
    except Exception:
        discard_adapter(model, name)  # all or nothing: an init refused after attaching leaves no adapter behind
        raise
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate one adapter or several (their deltas add up). Active adapters are trainable, except the
    parameters their deltas freeze (``Delta.frozen_names``) and adapters loaded for inference.
    Raises AdapterError for an unknown name (with near matches), a name given twice or one that is not a string, and
    for adapters that cannot be active together on a layer (``Delta.conflict``: token rows with overlapping
    indices), before anything changes. ``[]`` activates none (the base model)."""
    _set_active(model, adapter_list(model, names, "set_adapter"), *_walk(model))


def _set_active(model: nn.Module, names: list[str], layers: list[tuple[str, AdapterLayer]],
                wrappers: list[tuple[str, ModulesToSaveWrapper]]) -> None:
    """``set_adapter`` on the (checked) ``names``, given the model's current adapted layers and save wrappers."""
    state = adapter_state(model)
    for path, layer in layers:
        here = [n for n in names if n in layer.adapters]
        # (only deltas that define a conflict are asked, so plain adapters cost no pairwise loop)
        asking = [n for n in here if type(layer.adapters[n]).conflict is not Delta.conflict] if len(here) > 1 else []
        for first in asking:
            for second in (n for n in here if n != first):
                why = layer.adapters[first].conflict(layer.adapters[second])
                if why is not None:
                    raise AdapterError(f"adapters {first!r} and {second!r} cannot be active together at {path!r}: "
                                       f"they {why}.")
    merged = _merged_names(layers)
    leaving = [n for n in merged if n not in names]
    if leaving:
        warnings.warn(f"adapters {merged} are merged into the base weights; unmerging them before activating "
                      f"{names} (as PEFT does), so that the model computes base + {' + '.join(names) or 'nothing'}",
                      stacklevel=3)
        for _, layer in layers:
            layer.unmerge()
    state.active = names
    for _, layer in layers:
        layer.active = [n for n in names if n in layer.adapters]
    for _, wrapper in wrappers:
        wrapper.active = [n for n in names if n in wrapper.copies]
    _refresh_trainable(state, layers, wrappers)


def refresh_trainable(model: nn.Module) -> None:
    """Re-apply ``requires_grad`` to every adapter parameter from the current state.

    A parameter trains iff its adapter is active, was not loaded for inference (``inference_mode``), and its
    delta does not name it in :meth:`Delta.frozen_names <lorakit.core.delta.Delta.frozen_names>`.
    ``set_adapter`` calls this; call it yourself after changing what a delta freezes (stages, gradual
    freezing). Base parameters are not touched. Raises AdapterError when a delta names a frozen parameter it
    does not have.
    """
    _refresh_trainable(adapter_state(model), *_walk(model))


def _refresh_trainable(state: AdapterState, layers: list[tuple[str, AdapterLayer]],
                       wrappers: list[tuple[str, ModulesToSaveWrapper]]) -> None:
    for path, layer in layers:
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
    for _, wrapper in wrappers:
        for n, c in wrapper.copies.items():
            for p in c.parameters():
                p.requires_grad_(n in state.active and not state.configs[n].inference_mode)


def active_adapters(model: nn.Module) -> list[str]:
    return list(adapter_state(model).active)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters merged into at least one layer's base weights, in merge order."""
    return _merged_names(adapter_layers(model))


def _merged_names(layers) -> list[str]:
    out: list[str] = []
    for _, layer in layers:
        out += [n for n in layer.merged if n not in out]
    return out


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> [names]`` for every parameter registered under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(host_path(n))
    return {k: v for k, v in names.items() if len(v) > 1}


def _unwrap(model: nn.Module, keep: dict[int, str] | None = None) -> None:
    """Put plain modules back; ``keep[id(wrapper)]`` names the adapter whose modules_to_save copy replaces it."""
    keep = keep or {}
    for path, layer in list(adapter_layers(model)):
        parent, attr = _get_parent(model, path)
        setattr(parent, attr, layer.base_layer)
    for path, wrapper in list(_save_wrappers(model)):
        parent, attr = _get_parent(model, path)
        module = wrapper.copies[keep[id(wrapper)]] if id(wrapper) in keep else wrapper.original_module
        setattr(parent, attr, module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter get their plain base layer back.

    The other active adapters stay active. Where ``name`` was the only active one and others remain, the first
    of them by sorted name is activated, with a warning, as PEFT does (peft/tuners/tuners_utils.py
    ``BaseTunerLayer.delete_adapter``). Raises AdapterError for an unknown name (with near matches) or one merged
    into the base (unmerge it first)."""
    state = adapter_state(model)
    if name not in state.configs:
        raise UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, state.configs)} "
                                  f"Loaded: {list(state.configs)}")
    layers, wrappers = _walk(model)
    for path, layer in layers:
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged into {path!r}; unmerge_adapter before deleting it")
    restore_base(model, name)  # an init that moved part of the base into the adapter gives it back (weights only)
    for path, layer in layers:
        if name in layer.adapters:
            del layer.adapters[name]
        if len(layer.adapters) == 0:
            parent, attr = _get_parent(model, path)
            setattr(parent, attr, layer.base_layer)
    for path, wrapper in wrappers:
        if name in wrapper.copies:
            del wrapper.copies[name]
        if len(wrapper.copies) == 0:
            parent, attr = _get_parent(model, path)
            setattr(parent, attr, wrapper.original_module)
    layers = [(path, layer) for path, layer in layers if len(layer.adapters)]  # those still in the model
    wrappers = [(path, wrapper) for path, wrapper in wrappers if len(wrapper.copies)]
    config = state.configs.pop(name)
    _teardown(model, config, name)
    if not state.configs and state.hook_id is not None:
        model._forward_pre_hooks.pop(state.hook_id, None)
        state.hook_id = None
    remaining = [n for n in state.active if n != name]
    if not remaining and name in state.active and state.configs:
        remaining = sorted(state.configs)[:1]
        warnings.warn(f"adapter {name!r} was active and is deleted; the active adapter is now {remaining[0]!r} "
                      "(the first remaining by name, as PEFT chooses). Call set_adapter to choose another.",
                      stacklevel=2)
    if remaining:
        _set_active(model, remaining, layers, wrappers)  # names known: each is in state.configs
    else:
        _set_no_active(model, layers, wrappers)


def discard_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` and activate nothing in its place: the other active adapters stay active, and where it
    was the only active one none is (the undo of loading or adding it temporarily, e.g. ``merge_adapters``' sources,
    an ``add_adapter`` whose init failed). :func:`delete_adapter` would activate another one, as PEFT does. Raises
    as :func:`delete_adapter`."""
    set_adapter(model, [n for n in adapter_state(model).active if n != name])
    delete_adapter(model, name)


def _set_no_active(model: nn.Module, layers: list[tuple[str, AdapterLayer]],
                   wrappers: list[tuple[str, ModulesToSaveWrapper]]) -> None:
    state = adapter_state(model)
    state.active = []
    for _, layer in layers:
        layer.active = []
    for _, w in wrappers:
        w.active = []


@dataclass
class _MergeRecord:
    layer: AdapterLayer
    names: list[str]
    kept: bool


def _merge_records(model: nn.Module, layers=None) -> list[_MergeRecord]:
    return [_MergeRecord(layer, list(layer.merged), layer._original is not None)
            for _, layer in (adapter_layers(model) if layers is None else layers) if layer.merged]


def _restore_merges(model: nn.Module, records: list[_MergeRecord]) -> None:
    """Bring every layer back to the merged adapters ``records`` holds (others end unmerged)."""
    wanted = {id(r.layer): r for r in records}
    for _, layer in adapter_layers(model):
        r = wanted.get(id(layer))
        if r is None or layer.merged != r.names:
            layer.unmerge()
    again = [r for r in records if r.layer.merged != r.names]
    twins = tied_parameters(model) if again else {}  # a walk over every parameter: only when something re-merges
    for r in again:
        shared = id(getattr(r.layer.base_layer, "weight", None)) in twins
        r.layer.merge(r.names, keep_original=r.kept, untie=shared and _unties(r.layer, r.names))


def _unties(layer: AdapterLayer, names: list[str]) -> bool:
    """Whether merging ``names`` into ``layer``, whose weight is tied to another module's, needs a private copy of it:
    yes unless each of them is a delta the twins share (``Delta.keeps_tied_weights``)."""
    return any(n in layer.adapters and not layer.adapters[n].keeps_tied_weights for n in names)


@contextlib.contextmanager
def temporarily_unmerged(model: nn.Module) -> Iterator[None]:
    """Unmerge every merged adapter inside the block and merge exactly the same ones back after it."""
    with _unmerged(model, None):
        yield


@contextlib.contextmanager
def _unmerged(model: nn.Module, layers: list[tuple[str, AdapterLayer]] | None) -> Iterator[None]:
    """``temporarily_unmerged`` given the model's adapted layers now (None: walk the model for them). The exit
    walks the model again: the block may have added or merged layers."""
    records = _merge_records(model, layers)
    try:
        for r in records:
            r.layer.unmerge()  # exact when merged with keep_original, else up to rounding
        yield
    finally:
        _restore_merges(model, records)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (merged adapters are unmerged, then merged back).

    Leaving the block restores exactly the state found on entry, also when the block raises and when blocks
    are nested (an inner block's exit leaves the outer one disabled). Layers added inside the block start
    disabled too.
    """
    state = adapter_state(model)
    layers, wrappers = _walk(model)
    flags = {id(m): m.disabled for _, m in layers + wrappers}
    state.disabled += 1
    try:
        with _unmerged(model, layers):
            for _, m in layers + wrappers:
                m.disabled = True
            yield
    finally:
        state.disabled -= 1
        layers, wrappers = _walk(model)  # the block may have added layers
        for _, m in layers + wrappers:
            m.disabled = flags.get(id(m), state.disabled > 0)


def merge_adapter(model: nn.Module, names: str | list[str] | None = None, *, keep_original: bool | None = None) -> None:
    """Fold the given (one name or a list; default: the active) adapters into the base weights; forward skips them
    while merged. Merging an adapter that is merged already leaves it as it is (as PEFT, which warns). Raises
    AdapterError as :func:`set_adapter` does for the names (unknown, repeated, not a string), for an adapter a
    layer cannot merge, and inside a :func:`disable_adapters` block (which runs the base model), before any layer
    changes.

    Unmerging subtracts the same terms again (exact up to float rounding, ~1e-7 relative in fp32, like PEFT).
    ``keep_original=True`` keeps a copy of each merged layer's base weights so that ``unmerge_adapter``
    restores them bit for bit, at the cost of that memory while merged. The default (None) does so for
    float16/bfloat16 bases only, where arithmetic unmerging would visibly damage the base weights.
    """
    state = adapter_state(model)
    names = list(state.active) if names is None else adapter_list(model, names, "merge_adapter")
    if state.disabled and names:
        raise AdapterError(f"merge_adapter({names}) inside a disable_adapters block: the block runs the base model, "
                           f"which a merge would change (and the block's end unmerges what it did not find merged); "
                           f"merge after the block.")
    for _, layer in adapter_layers(model):  # all or nothing: refuse before any layer changes
        layer.check_merge(names)
    twins = tied_parameters(model)
    before = _merge_records(model)
    try:
        for path, layer in adapter_layers(model):
            shared = twins.get(id(getattr(layer.base_layer, "weight", None)))
            untie = bool(shared) and not layer.merged and _unties(layer, names)
            if untie:
                warnings.warn(f"{path!r} shares its weight with {[n for n in shared if not n.startswith(path + '.')]} "
                              f"(tied weights); merging unties them: {path!r} gets its own merged copy and the others "
                              f"keep the base weight (unmerging ties them again)", stacklevel=2)
            layer.merge(names, keep_original=keep_original, untie=untie)
    except BaseException:
        _restore_merges(model, before)
        raise


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (the inverse of :func:`merge_adapter`): the kept
    original weights are restored bit for bit where ``merge_adapter`` kept them (and a tied weight is re-tied),
    else the merged terms are subtracted. Layers with nothing merged are left alone."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _teardown(model: nn.Module, config: AdapterConfig, name: str) -> None:
    method = get_method(config)
    if method.teardown is not None:
        method.teardown(model, name)


def merge_and_unload(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Merge the given (one name or a list; default: the active) adapters and return the plain host model, with no
    lorakit layer left; the other adapters are dropped unmerged.

    A modules_to_save module keeps the copy of the one merged adapter that has one. Raises AdapterError (before
    changing anything) when several of ``names`` have their own copy of the same module: no single module is
    then right for all of them.
    """
    state = adapter_state(model)
    names = list(state.active) if names is None else adapter_list(model, names, "merge_and_unload")
    keep: dict[int, str] = {}
    for path, wrapper in _save_wrappers(model):
        owners = [n for n in names if n in wrapper.copies]
        if len(owners) > 1:
            raise AdapterError(f"adapters {owners} each have their own copy of {path!r} (modules_to_save); merging "
                               f"them together cannot keep both. Merge and unload one of them.")
        if owners:
            keep[id(wrapper)] = owners[0]
    others = [n for n in merged_adapters(model) if n not in names]
    if others:
        warnings.warn(f"adapters {others} are merged but not among {names}; unmerging them first so that the "
                      f"returned model is base + {' + '.join(names) or 'nothing'}", stacklevel=2)
        unmerge_adapter(model)
    dropped = [n for n in state.inits if n not in names]
    if dropped:  # adapters dropped unmerged give back what their init took from the base
        unmerge_adapter(model)
        for n in dropped:
            restore_base(model, n)
    merge_adapter(model, names)
    if any(layer.untied for _, layer in adapter_layers(model)):
        _untie_config(model)
    _unwrap(model, keep)
    for n, config in list(state.configs.items()):
        _teardown(model, config, n)
    _forget(model)
    return model


def _untie_config(model: nn.Module) -> None:
    """Merged weights were untied: say so in the model config, or save/load (tie_weights) would tie them again."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text) and get_text() is not config:
        configs.append(get_text())
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


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
        _forget(model)
    return model


def adapter_parameters(model: nn.Module, name: str, *, trainable_only: bool = False) -> dict[str, nn.Parameter]:
    """Parameters of adapter ``name`` (deltas and modules_to_save copies), by their name in the model.

    ``trainable_only=True`` leaves out what the adapter's deltas freeze (``Delta.frozen_names``), whether or
    not the adapter is active now: the parameters an optimizer for this adapter should hold.
    """
    if name not in adapter_state(model).configs:
        raise UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, adapter_names(model))} "
                                  f"Loaded: {adapter_names(model)}")
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
    """(trainable, total) parameter counts; the base copies under modules_to_save count once, and a quantized
    weight counts its logical elements (``quant_state.shape``), not its packed bytes."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return PEFT's line ``trainable params: T || all params: N || trainable%: P`` for ``model``
    (counts of :func:`trainable_parameters`)."""
    t, n = trainable_parameters(model)
    line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
    print(line)
    return line
