"""The method registry: a method is a config dataclass + a delta module (+ optional hooks), registered once.

The CLI's ``--method`` choices, ``lorakit methods``, the docs tables, the contract-test matrix and the
benchmark's method list all read :func:`list_methods`; nothing in the core branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

    from .config import AdapterConfig
    from .delta import Delta, LayerInfo


@dataclass(frozen=True)
class Method:
    """Everything the core needs to know about one method.

    ``build(base_layer, info, config, path=module_path)`` returns the :class:`~lorakit.core.delta.Delta` for one adapted
    layer. It must also run under ``torch.device("meta")``, reading back no values of the tensors it makes (they hold
    none there): a loader builds every delta on the meta device and checks the file against it before anything is
    allocated (``core.model.meta_plan``), then gives that build the file's values (``core.model.materialise``), or,
    where the delta holds tensors the file does not give (unregistered, non-persistent), builds it again for real.
    Optional hooks (each takes the model and adapter name first):

    - ``init(model, name, batches)``: data-driven initialisation before step 0;
    - ``on_step(model, name, step, total_steps)``: per-step procedure (schedules, freezing, projections); returns
      False when it changed nothing of which parameters train, True when it did (``Delta.frozen_names``): the loop
      re-reads them (``refresh_trainable``) after True, and after None (a hook that does not say);
    - ``param_groups(model, name, lr)``: optimizer parameter groups (e.g. per-matrix learning rates);
    - ``extra_loss(model, name)``: an auxiliary loss added to the task loss (balance, regularisers);
    - ``to_lora(model, name)``: (LoraConfig, PEFT state dict) for methods expressible as plain LoRA.
    """

    name: str
    config_cls: type["AdapterConfig"]
    build: Callable[["nn.Module", "LayerInfo", "AdapterConfig"], "Delta"]
    description: str
    paper: str = ""
    peft_type: str | None = None
    layer_kinds: tuple[str, ...] = ("linear",)
    # ``prepare(model, config) -> config``: resolve model-dependent settings (e.g. the number of layers)
    # before any delta is built; the returned config is the one stored and saved.
    prepare: Callable[..., Any] | None = None
    # ``teardown(model, name)``: undo model-level state the method installed (hooks), called after the adapter
    # is removed by delete_adapter / unload / merge_and_unload.
    teardown: Callable[..., Any] | None = None
    # Extra ``model.generate`` arguments the method needs while active (X-LoRA: {"use_cache": False}).
    generate_kwargs: Mapping[str, Any] = field(default_factory=dict)
    init: Callable[..., Any] | None = None
    on_step: Callable[..., Any] | None = None
    param_groups: Callable[..., Any] | None = None
    extra_loss: Callable[..., Any] | None = None
    to_lora: Callable[..., Any] | None = None
    # ``to_original_base(config, file_config, tensors, edits) -> (file_config, tensors)``: rewrite the saved file
    # (tensors keyed ``<module path>.<param>``) so it works on the original base, given the init's base edits
    # (``core.inits.BaseEdit`` by module path); used by ``save_adapter(..., original_base=True)``.
    to_original_base: Callable[..., Any] | None = None
    # (config, layer infos) -> extra fields for adapter_config.json (e.g. PEFT's fan_in_fan_out).
    file_fields: Callable[..., dict[str, Any]] | None = None
    # Tensor names (the last part of a file key) that PEFT's files carry but the method rebuilds from its config
    # (RandLoRA's seeded bases): the loader skips them instead of calling them unexpected.
    regenerated_keys: tuple[str, ...] = ()
    # ``check_file(config, tensors)``: raise AdapterLoadError where a saved file's tensors (keyed ``<module path>.
    # <param>``) contradict its config beyond shapes (γ-MoD: the blocks its router was trained to route). Called by
    # load_adapter and lorakit inspect before anything is attached.
    check_file: Callable[..., None] | None = None
    # Tensor names (the last part of a key) a file written by an older lorakit may lack: the fresh value stands.
    optional_keys: tuple[str, ...] = ()
    # Whether a freshly added adapter leaves outputs unchanged (checked by the contract tests).
    zero_init: bool = True
    # Whether the adapter has a fixed ΔW that can be merged into the base (mixtures do not).
    mergeable: bool = True
    # For methods that route on per-call information (keys, masks): ``example_routing(input_ids)`` returns
    # the ``routing(...)`` kwargs a test or benchmark forward needs.
    example_routing: Callable[..., dict[str, Any]] | None = None
    # Named config variants (kwargs) every test matrix and benchmark runs, e.g. {"dora": {"use_dora": True}}.
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    # Variants the benchmarks train on the bundled base model, for a method whose ``variants`` are sized for the
    # tiny contract-test models and are not its faithful default on a full model (γ-MoD: a block index the
    # official rule keeps dense). None: ``variants``.
    bench_variants: Mapping[str, Mapping[str, Any]] | None = None

    def benchmark_variants(self) -> Mapping[str, Mapping[str, Any]]:
        """The variants a benchmark on the bundled base trains: ``bench_variants`` if given, else ``variants``."""
        return self.variants if self.bench_variants is None else self.bench_variants


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, config: type["AdapterConfig"], build: Callable[..., "Delta"], description: str,
                    **options: Any) -> Method:
    """Register a method under ``name``. Call once, at import of the method's module."""
    if name in _METHODS and _METHODS[name].config_cls is not config:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].config_cls.__qualname__}")
    config.method = name
    method = Method(name=name, config_cls=config, build=build, description=description, **options)
    _METHODS[name] = method
    return method


def get_method(name_or_config: "str | AdapterConfig") -> Method:
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).method
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}.{did_you_mean(name, _METHODS)} Registered methods: {', '.join(sorted(_METHODS))}."
        ) from None


def method_for_file(config_dict: Mapping[str, Any], *, source: str = "config") -> Method:
    """The method a saved adapter_config.json belongs to (lorakit's name first, then PEFT's peft_type)."""
    name = config_dict.get("lorakit_method")
    if name is not None:
        return get_method(name)
    peft_type = config_dict.get("peft_type")
    if peft_type is None:
        raise UnknownMethodError(f"{source}: neither 'lorakit_method' nor 'peft_type' is set; cannot tell the method.")
    for m in _METHODS.values():
        if m.peft_type is not None and m.peft_type == str(peft_type).upper():
            return m
    names = [m.peft_type for m in _METHODS.values() if m.peft_type]
    raise UnknownMethodError(
        f"{source}: peft_type {peft_type!r} is not supported by lorakit.{did_you_mean(str(peft_type), names)} "
        f"Supported PEFT types: {', '.join(sorted(names))}; lorakit methods: {', '.join(sorted(_METHODS))}."
    )


def list_methods() -> list[Method]:
    return [_METHODS[k] for k in sorted(_METHODS)]


def generate_kwargs_for(model: "nn.Module") -> dict[str, Any]:
    """``generate`` arguments the model's active adapters need (empty for a model without lorakit adapters)."""
    state = getattr(model, "lorakit", None)
    out: dict[str, Any] = {}
    for name in getattr(state, "active", []):
        out.update(get_method(state.configs[name]).generate_kwargs)
    return out
