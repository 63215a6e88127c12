"""The init registry: initialisations that run on a model after an adapter is attached, outside the training loop.

An init sets an adapter's tensors from the base weights (PiSSA, OLoRA), from activations (EVA) or from gradients
(LoRA-GA), and may move part of the base weight into the adapter. Whatever it changes in the base it records as
a low-rank :class:`BaseEdit` (``W_now = W_orig + scaling · B A``), so that

- ``restore_base`` (and ``delete_adapter`` / ``unload``) put the original base weights back, and
- ``save_adapter(..., original_base=True)`` writes a file that works on the *original* base (PEFT's
  ``path_initial_model_for_weight_conversion``), through the method's ``to_original_base`` hook.

An init is chosen by name: by the config (for LoRA, PEFT's ``init_lora_weights`` value: ``"pissa"``,
``"olora"`` …, so the saved file stays a PEFT LoRA), by ``add_adapter(..., init=NAME)`` or by
:func:`init_adapter`. Implementations live in ``lorakit/init/`` (one file per init family) and call
:func:`register_init` once at import, like methods. This module only holds the registry and the records.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from .config import _type_name, _type_ok, plain_scalars
from .errors import AdapterError, ConfigError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

    from .layer import AdapterLayer


@dataclass(frozen=True)
class Init:
    """One registered initialisation.

    ``run(model, adapter_name, batches, spec, **options) -> dict[path, BaseEdit]`` sets the adapter's tensors
    in place and returns what it changed in the base (``{}`` when the base is untouched); ``spec`` is the value
    that named it (e.g. ``"pissa_niter_4"``). ``pattern`` is a regular expression every accepted spelling
    matches in full (default: the name). ``needs_data``: ``run`` needs ``batches`` (a list of model-input
    dicts); such an init left pending by ``add_adapter`` runs in ``lorakit.training.train`` on its first
    batches. ``rerun_on_load``: loading a saved adapter whose config names this init recomputes it on the
    fresh base before copying the trained tensors (PiSSA / OLoRA, as PEFT does), since the file is relative
    to the changed base. ``random_pattern``: the specs (full match) whose run draws random numbers (PiSSA's
    randomised SVD, ``"pissa_niter_K"``): redone on load, the base it leaves is not the one the adapter was trained
    on (:meth:`reruns_exactly`).

    ``estimate(model, targets, batches, spec, **options) -> data`` (optional): the part of a data-driven init
    that needs only the base model (LoRA-GA's gradient pass). ``add_adapter`` given batches calls it before it
    builds the adapter, so the pass runs without the adapter's tensors in memory, then calls ``run`` with
    ``estimate=data``; ``run`` without it (``init_adapter`` on an attached adapter) makes the pass itself.
    ``targets``: ``(path, base layer, LayerInfo)`` of every module the adapter will adapt.

    ``rewrites``: the adapter config fields ``run`` may rewrite (EVA: ``target_modules``, ``rank_pattern``,
    ``alpha_pattern``); resuming a Trainer checkpoint accepts the checkpoint's values of these, and only these, in
    place of the config the user typed.

    ``fits(config) -> str | None`` (optional): why adapters of this config cannot take the init (None when they
    can), from the config alone, so that :func:`check_init_config` refuses a mismatch (LoRA-SB on a plain LoRA)
    before any model loads or any data pass runs.

    ``configure(config, options) -> config`` (optional): the adapter config with the init's options written into it
    (LoftQ: ``loftq_bits`` / ``loftq_iter`` into ``loftq_config``), raising ConfigError for a value the config
    refuses. Needs no model, so :meth:`check_options` given the config checks the values before any model loads.

    ``spelling``: the other forms ``pattern`` accepts, as error messages list them (``"pissa_niter_K"``).

    ``base_low_rank``: what it changes in the base is low rank (:class:`BaseEdit`), so the adapter can be written
    as a LoRA for the untouched base (``save_adapter(..., original_base=True)``, ``lorakit export``). False for an
    init that replaces the weights (LoftQ: :class:`BaseSwap`).
    """

    name: str
    run: Callable[..., dict[str, "BaseEdit"]]
    description: str
    paper: str = ""
    pattern: str = ""
    needs_data: bool = False
    changes_base: bool = False
    rerun_on_load: bool = False
    estimate: Callable[..., Any] | None = None
    fits: Callable[[Any], str | None] | None = None
    rewrites: tuple[str, ...] = ()
    random_pattern: str = ""
    base_low_rank: bool = True
    configure: Callable[[Any, Mapping[str, Any]], Any] | None = None
    spelling: str = ""

    @property
    def spellings(self) -> str:
        """How error messages list it: the name, and ``spelling`` (the other forms ``pattern`` accepts) after it."""
        return f"{self.name} / {self.spelling}" if self.spelling else self.name

    def reruns_exactly(self, spec: Any) -> bool:
        """True when loading a file whose config names ``spec`` can redo this init exactly (``rerun_on_load``, and
        ``spec`` draws no random numbers): the base it rebuilds is then the one the adapter was trained on."""
        random = bool(self.random_pattern) and re.fullmatch(self.random_pattern, str(spec)) is not None
        return self.rerun_on_load and not random

    def accepts(self, spec: Any) -> bool:
        return isinstance(spec, str) and re.fullmatch(self.pattern or re.escape(self.name), spec) is not None

    def option_names(self) -> list[str]:
        """The options ``run`` takes (its keyword-only parameters; ``estimate`` is lorakit's, not the user's)."""
        params = inspect.signature(self.run).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "estimate"]

    def check_options(self, options: Mapping[str, Any], config: Any = None) -> None:
        """ConfigError naming an option this init does not take (with near matches), before anything runs; given the
        adapter ``config`` (with this init), also a value it refuses (``configure``)."""
        known = self.option_names()
        for key in options:
            if key not in known:
                takes = f"Options: {', '.join(known)}." if known else "It takes no options."
                raise ConfigError(f"unknown option {key!r} for init {self.name!r}.{did_you_mean(key, known)} {takes}")
        for key, value in options.items():
            hint = self.option_hint(key)
            if hint is not None and not _type_ok(value, hint):
                raise ConfigError(f"option {key!r} of init {self.name!r} must be {_type_name(hint)}, got {value!r} "
                                  f"({type(value).__name__}).")
        if config is not None and self.configure is not None:
            self.configure(config, options)

    def option_hint(self, key: str) -> Any:
        """The type annotation of option ``key`` of ``run`` (None: not annotated, or not evaluable here)."""
        annotation = inspect.signature(self.run).parameters[key].annotation
        if annotation is inspect.Parameter.empty:
            return None
        if not isinstance(annotation, str):
            return annotation
        try:  # the init's module writes its annotations as strings (``from __future__ import annotations``)
            return eval(annotation, getattr(self.run, "__globals__", {}))  # noqa: S307 - our own source's annotation
        except Exception:
            return None


@dataclass
class BaseEdit:
    """A low-rank change an init made to one base layer: ``W_now = W_orig + scaling · B @ A`` for the weight
    as (out, in); ``A`` (r, in), ``B`` (out, r), float32 on the layer's device."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # (out, in)

    def add_to(self, layer: "AdapterLayer", sign: float = 1.0) -> None:
        """``W += sign · scaling · B A`` on ``layer``'s base weight (``sign=-1`` undoes the edit)."""
        add_low_rank_to_base_weight(layer, self.B, self.A, sign * self.scaling)

    def undo(self, layer: "AdapterLayer") -> None:
        """Put ``layer``'s original base weight back (up to float rounding)."""
        self.add_to(layer, sign=-1.0)


@dataclass
class BaseSwap:
    """A base weight an init replaced outright by one of full rank (LoftQ: ``W -> Q``, its quantized value), which
    no ``B A`` records: the original weight as the layer stores it (same dtype, layout and device, so it costs what
    the weight costs), put back bit for bit by :meth:`undo`. It cannot be folded into a LoRA for the original base
    (``save_adapter(..., original_base=True)``, merging with the original base refuse it)."""

    original: torch.Tensor

    def undo(self, layer: "AdapterLayer") -> None:
        with torch.no_grad():
            layer.base_layer.weight.copy_(self.original)


@dataclass
class InitRecord:
    """What ``init_adapter`` did for one adapter: the init's name, the spelling that chose it, base edits."""

    init: str
    spec: str
    edits: dict[str, BaseEdit | BaseSwap] = field(default_factory=dict)


_INITS: dict[str, Init] = {}
_OPTIONS: "weakref.WeakKeyDictionary[nn.Module, dict[str, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def register_init(name: str, *, run: Callable[..., dict[str, BaseEdit]], description: str, **options: Any) -> Init:
    """Register an init under ``name``. Call once, at import of the init's module (in ``lorakit/init/``)."""
    if name in _INITS and _INITS[name].run is not run:
        raise ValueError(f"init {name!r} is already registered by {_INITS[name].run.__qualname__}")
    init = Init(name=name, run=run, description=description, **options)
    _INITS[name] = init
    return init


def find_init(spec: Any) -> Init | None:
    """The registered init a spelling names (``"pissa_niter_4"`` -> PiSSA), else None."""
    for init in _INITS.values():
        if init.accepts(spec):
            return init
    return None


def changed_base_error(where: str, spec: Any, use: str) -> str | None:
    """Why an adapter whose config names init ``spec`` cannot be read as a LoRA of the untouched base (None when it
    can): an init that changes the base weights (PiSSA, OLoRA, CorDA, LoRA-GA; ``Init.changes_base``) left A, B for
    the base it edited. ``where`` names the adapter, ``use`` says what the untouched base is for (the words after
    "not for the untouched base"). Callers raise it as their own error type."""
    init = find_init(spec) if isinstance(spec, str) else None
    if init is None or not init.changes_base:
        return None
    if not init.base_low_rank:
        return (f"{where}: init_lora_weights={spec!r} replaced the base weights (LoftQ: by their quantized values), "
                f"so its A, B are for that base, not for the untouched base {use}, and no LoRA for the untouched "
                f"base exists. Load it on its own (load_adapter / lorakit eval / generate redo the init).")
    return (f"{where}: init_lora_weights={spec!r} moved part of the base into the adapter, so its A, B are for the "
            f"base that init left, not for the untouched base {use}. Write it for the untouched base first: "
            f"`lorakit export ADAPTER --output DIR` (a plain LoRA of rank 2r; for a data-driven init such as lora_ga, "
            f"save_adapter(..., original_base=True) where it was trained), then use DIR.")


def own_init_field(config: Any, spec: Any) -> str | None:
    """The field of ``config`` (an ``AdapterConfig``) that takes ``spec`` as a value of the method's own start, when
    ``spec`` is no registered init: ``"init_lora_weights"`` for LoRA's ``"gaussian"`` / ``"orthogonal"`` / ``"mica"``
    (PEFT's ``init_lora_weights`` values that set A and B without an init of lorakit's). None otherwise."""
    if not isinstance(spec, str) or find_init(spec) is not None:
        return None
    try:
        own = config.with_init(spec)
    except Exception:  # noqa: BLE001  (no such value, or a method without an init field)
        return None
    return next((f.name for f in dataclasses.fields(own) if getattr(own, f.name) == spec), None)


def check_init_config(spec: str, config: Any) -> Init:
    """The init ``spec`` names, after checking that ``config`` (an ``AdapterConfig``) can take it: its method has
    a field that selects an init (``config.with_init``) and the init works on that method's adapters
    (``Init.fits``). Needs no model: front ends call it before loading one. Raises ConfigError naming both; for a
    value of the method's own start (``"gaussian"``: :func:`own_init_field`) or a non-string, naming the config
    field that takes it (``init=`` / ``--init`` run registered inits only, as :func:`list_inits` lists them)."""
    if not isinstance(spec, str):
        raise ConfigError(f"init={spec!r}: init names a registered init, as a string ({_registered()}); a method's "
                          f"own start is a value of its config (LoRA's LoraConfig(init_lora_weights={spec!r})).")
    field = own_init_field(config, spec)
    if field is not None:
        cls = type(config).__name__
        raise ConfigError(f"init={spec!r}: {spec!r} is no registered init (init= runs those: {_registered()}) but a "
                          f"value of {cls}.{field}; set it there: {cls}(..., {field}={spec!r}).")
    init = get_init(spec)
    config = config.with_init(spec)  # ConfigError for a method without an init field
    reason = init.fits(config) if init.fits is not None else None
    if reason:
        raise ConfigError(f"init {spec!r} cannot initialise a {type(config).method!r} adapter: {reason}")
    return init


def get_init(spec: str) -> Init:
    """The registered init ``spec`` names; ConfigError with near matches otherwise."""
    init = find_init(spec)
    if init is None:
        raise ConfigError(f"unknown init {spec!r}.{did_you_mean(str(spec), _INITS)} Registered inits: "
                          f"{_registered()}.")
    return init


def _registered() -> str:
    return ", ".join(_INITS[k].spellings for k in sorted(_INITS)) or "none"


def list_inits() -> list[Init]:
    """Every registered initialisation, sorted by name (what ``lorakit train --init`` and ``add_adapter(...,
    init=NAME)`` accept; each :class:`Init` has its ``name``, ``description``, ``needs_data`` and ``changes_base``)."""
    return [_INITS[k] for k in sorted(_INITS)]


# -- running inits and undoing their base edits ------------------------------------------------------------
def requested_init(model: "nn.Module", adapter_name: str) -> Init | None:
    """The init adapter ``adapter_name``'s config asks for (None: the method's own default init)."""
    from .model import adapter_state

    spec = adapter_state(model).configs[adapter_name].requested_init()
    return None if spec is None else get_init(spec)


def init_pending(model: "nn.Module", adapter_name: str) -> bool:
    """True when the adapter's config names an init that has not run yet (a data-driven one left by add_adapter)."""
    from .model import adapter_state

    return requested_init(model, adapter_name) is not None and adapter_name not in adapter_state(model).inits


def set_init_options(model: "nn.Module", adapter_name: str, **options: Any) -> None:
    """Options for adapter ``adapter_name``'s init whenever it runs later (e.g. a data-driven init the training
    loop runs on its first batches): ``init_adapter`` uses them under the options it is given itself."""
    _OPTIONS.setdefault(model, {})[adapter_name] = {k: plain_scalars(v) for k, v in options.items()}


def init_options(model: "nn.Module", adapter_name: str) -> dict[str, Any]:
    """The options ``set_init_options`` stored for adapter ``adapter_name`` (empty when none)."""
    return dict(_OPTIONS.get(model, {}).get(adapter_name, {}))


def init_adapter(model: "nn.Module", adapter_name: str = "default", batches: Iterable[Mapping[str, Any]] | None = None,
                 *, init: str | None = None, **options: Any) -> InitRecord:
    """Run an init on adapter ``adapter_name`` of ``model`` now, outside any training loop.

    ``init``: a registered init's name (a PEFT ``init_lora_weights`` value for LoRA); None = the one the
    adapter's config names. Naming one also writes it into the config (``config.with_init``), so the saved file
    says how it was initialised. ``batches``: model-input dicts (``input_ids``, ``attention_mask`` …) for
    data-driven inits, e.g. a few batches of the training data. ``options`` go to the init (NumPy scalars as the
    Python numbers they hold).

    Running an init again first restores the base it changed before. Returns the :class:`InitRecord` (also kept
    on the model). Raises AdapterError (unknown adapter, merged adapter, missing batches) and ConfigError
    (unknown init, a method without an init field, or one whose adapters the init cannot set: ``Init.fits``).
    """
    from .model import adapter_state, check_adapter

    check_adapter(model, adapter_name)
    state = adapter_state(model)
    config = before = state.configs[adapter_name]
    if init is not None:
        found = check_init_config(init, config)
        config = state.configs[adapter_name] = config.with_init(init)
        spec = init
    else:
        spec = config.requested_init()
        if spec is None:
            raise AdapterError(f"adapter {adapter_name!r}'s config names no init; pass init=NAME "
                               f"(registered: {', '.join(sorted(_INITS))}).")
        found = check_init_config(spec, config)
    options = {**init_options(model, adapter_name), **{k: plain_scalars(v) for k, v in options.items()}}
    try:
        found.check_options({k: v for k, v in options.items() if k != "estimate"}, config)
    except ConfigError:
        state.configs[adapter_name] = before
        raise
    if found.changes_base:
        from .model import adapter_layers

        try:
            check_float_base(found.name, ((path, layer.base_layer) for path, layer in adapter_layers(model)
                                          if adapter_name in layer.adapters and layer.info.kind == "linear"))
            _check_no_swap_overlap(state, adapter_name, found,
                                   {path for path, layer in adapter_layers(model) if adapter_name in layer.adapters})
        except AdapterError:
            state.configs[adapter_name] = before
            raise
    batches = None if batches is None else list(batches)
    if found.needs_data and not batches:
        state.configs[adapter_name] = before
        raise AdapterError(f"init {found.name!r} is data-driven: pass batches (a few model-input dicts, e.g. from the "
                           "training data), or let lorakit.training.train run it on its first batches.")
    _check_unmerged(model, adapter_name, f"initialise adapter {adapter_name!r}")
    if adapter_name in state.inits:
        restore_base(model, adapter_name)
    try:
        with torch.no_grad():
            edits = found.run(model, adapter_name, batches, spec, **options)
    except Exception:
        state.configs[adapter_name] = before  # inits check everything before they write, so only this changed
        raise
    record = InitRecord(init=found.name, spec=str(spec), edits=dict(edits))
    state.inits[adapter_name] = record
    return record


def _check_no_swap_overlap(state: Any, adapter_name: str, init: Init, paths: set[str]) -> None:
    """AdapterError when ``init`` and another adapter's recorded init would both change one base weight and one of
    them replaces it (:class:`BaseSwap`, LoftQ): low-rank edits add up and undo in any order, but a replaced weight
    restored before or after an added edit leaves neither original."""
    for other, record in state.inits.items():
        if other == adapter_name:
            continue
        shared = sorted(p for p in paths if p in record.edits)
        swaps = [p for p in shared if isinstance(record.edits[p], BaseSwap)]
        if swaps or (shared and not init.base_low_rank):
            raise AdapterError(f"init {init.name!r} of adapter {adapter_name!r} would change base weights that "
                               f"the init {record.init!r} of adapter {other!r} already changed (e.g. {shared[0]!r}), and "
                               f"one of the two replaces them (LoftQ), so restoring the base could not undo both. "
                               f"restore_base(model, {other!r}) or delete that adapter first, or give them "
                               "separate modules.")


def check_float_base(init: str, layers: Iterable[tuple[str, "nn.Module"]]) -> None:
    """AdapterError naming the first of ``layers`` ((path, base layer) pairs) whose stored weight is not floating
    point (packed 4-bit codes): an init that changes the base writes into it (PiSSA, OLoRA, CorDA) or needs its
    gradient (LoRA-GA), which quantised codes cannot take."""
    for path, base in layers:
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
            raise AdapterError(f"init {init!r} changes the base weights, but module {path!r} stores its weight as "
                               f"{weight.dtype} codes (a quantised base, e.g. 4-bit NF4). Initialise on the "
                               "full-precision base (loftq quantizes it itself; pissa / olora: quantise the residual "
                               "afterwards, QPiSSA), or use an init that leaves the base as it is (eva).")


def base_edits(model: "nn.Module", adapter_name: str) -> dict[str, BaseEdit | BaseSwap]:
    """The base edits adapter ``adapter_name``'s init made, by host module path (empty when none): low-rank
    :class:`BaseEdit` s, or :class:`BaseSwap` s where the init replaced the weight (LoftQ)."""
    from .model import adapter_state

    record = adapter_state(model).inits.get(adapter_name)
    return {} if record is None else dict(record.edits)


def add_low_rank_to_base_weight(layer: "AdapterLayer", B: torch.Tensor, A: torch.Tensor, scaling: float) -> None:
    """``W += scaling · B @ A`` for an adapted layer's base weight, ``B`` (out, r), ``A`` (r, in), whatever the
    storage layout, without materialising the (out, in) product: one in-place ``addmm_`` on a float32 weight; a
    half-precision weight is updated through one float32 copy and rounded back (as PEFT's float32 arithmetic)."""
    weight = layer.base_layer.weight
    B, A = B.to(weight.device, torch.float32), A.to(weight.device, torch.float32)
    left, right = (A.T, B.T) if layer.info.fan_in_fan_out else (B, A)  # stored (in, out): W += s · Aᵀ Bᵀ
    with torch.no_grad():
        if weight.dtype == torch.float32:
            weight.addmm_(left, right, alpha=scaling)
        else:
            weight.copy_(weight.float().addmm_(left, right, alpha=scaling))


def restore_base(model: "nn.Module", adapter_name: str) -> None:
    """Undo what adapter ``adapter_name``'s init did to the base weights (exact up to float rounding).

    The adapter keeps its tensors; the init is no longer recorded (so it counts as pending again).
    ``delete_adapter`` and ``unload`` call this. Raises AdapterError while any adapter is merged into a layer
    the init changed."""
    from .model import adapter_layers, adapter_state

    state = adapter_state(model)
    record = state.inits.get(adapter_name)
    if record is None:
        return
    if record.edits:
        _check_unmerged(model, adapter_name, f"restore the base weights {adapter_name!r}'s init changed")
        layers = dict(adapter_layers(model))
        for path, edit in record.edits.items():
            edit.undo(layers[path])
    del state.inits[adapter_name]


def _check_unmerged(model: "nn.Module", adapter_name: str, doing: str) -> None:
    from .model import adapter_layers

    merged = [path for path, layer in adapter_layers(model) if layer.merged and adapter_name in layer.adapters]
    if merged:
        raise AdapterError(f"cannot {doing} while adapters are merged into {merged[:3]}; call unmerge_adapter first.")


# -- init records as tensors (kept in a training checkpoint's model state) ------------------------------------
RECORD_KEY = "lorakit_init."


def init_record_tensors(model: "nn.Module", prefix: str = "") -> dict[str, torch.Tensor]:
    """Every adapter's :class:`InitRecord` on ``model`` as tensors, for a checkpoint of the whole model state
    (``transformers.Trainer``'s ``model.safetensors``) that must let a resumed run undo the init's base edits.

    Keys, under ``prefix``: ``lorakit_init.<adapter>.record`` (the JSON ``{"init", "spec", "method", "config":
    the adapter's config after the init (EVA rewrites ranks), "scalings": {path: scaling}, "swaps": [path]}`` as
    uint8 bytes), ``lorakit_init.<adapter>.<path>.A`` / ``.B``: each :class:`BaseEdit`'s float32 ``A`` (r, in),
    ``B`` (out, r), and ``lorakit_init.<adapter>.<path>.original``: each :class:`BaseSwap`'s original weight.
    Empty when no init ran. Read back by :func:`pop_init_records`."""
    import json

    from .model import STATE_ATTR, adapter_state
    from .registry import get_method

    state = adapter_state(model) if hasattr(model, STATE_ATTR) else None
    out: dict[str, torch.Tensor] = {}
    for name, record in ({} if state is None else state.inits).items():
        config = state.configs[name]
        swaps = [path for path, edit in record.edits.items() if isinstance(edit, BaseSwap)]
        meta = {"init": record.init, "spec": record.spec, "method": get_method(config).name, "config": config.to_dict(),
                "scalings": {path: edit.scaling for path, edit in record.edits.items() if path not in swaps},
                "swaps": swaps}
        out[f"{prefix}{RECORD_KEY}{name}.record"] = torch.frombuffer(bytearray(json.dumps(meta).encode()),
                                                                     dtype=torch.uint8)
        for path, edit in record.edits.items():
            if isinstance(edit, BaseSwap):
                out[f"{prefix}{RECORD_KEY}{name}.{path}.original"] = edit.original.detach().clone()
                continue
            out[f"{prefix}{RECORD_KEY}{name}.{path}.A"] = edit.A.detach().clone()
            out[f"{prefix}{RECORD_KEY}{name}.{path}.B"] = edit.B.detach().clone()
    return out


def pop_init_records(state_dict: dict[str, torch.Tensor], prefix: str = "", *, partial: bool = False
                     ) -> dict[str, tuple[InitRecord, "Any"]]:
    """Remove what :func:`init_record_tensors` put into ``state_dict`` and return it: ``{adapter: (InitRecord,
    config)}``, the config as the registered method's config class. The edits' tensors stay on the state dict's
    device. AdapterError naming the key where a record lacks an edit's tensor or names an unknown method.

    ``partial=True`` (tensors gathered from the shards of a sharded checkpoint so far): a record whose tensors are
    not all there yet, and tensors of no record yet, stay in ``state_dict`` instead of raising."""
    import json

    from .registry import get_method

    head = prefix + RECORD_KEY
    names = [k[len(head):-len(".record")] for k in state_dict if k.startswith(head) and k.endswith(".record")]
    out: dict[str, tuple[InitRecord, Any]] = {}
    for name in names:
        key = f"{head}{name}.record"
        meta = json.loads(bytes(state_dict[key].to(torch.uint8).tolist()).decode())
        swaps = meta.get("swaps", [])
        parts = [f"{head}{name}.{path}.{ab}" for path in meta["scalings"] for ab in ("A", "B")]
        parts += [f"{head}{name}.{path}.original" for path in swaps]
        if partial and not all(k in state_dict for k in parts):
            continue
        del state_dict[key]
        try:
            config = get_method(meta["method"]).config_cls.from_dict(meta["config"], source=key)
        except Exception as e:
            raise AdapterError(f"{key}: cannot rebuild adapter {name!r}'s config: {e}") from None
        edits = {}
        for path, scaling in meta["scalings"].items():
            a, b = f"{head}{name}.{path}.A", f"{head}{name}.{path}.B"
            if a not in state_dict or b not in state_dict:
                raise AdapterError(f"{key} records a base edit of {path!r}, but the state holds no {a!r} / {b!r}.")
            edits[path] = BaseEdit(A=state_dict.pop(a).float(), B=state_dict.pop(b).float(), scaling=float(scaling))
        for path in swaps:
            key_w = f"{head}{name}.{path}.original"
            if key_w not in state_dict:
                raise AdapterError(f"{key} records that {path!r}'s base weight was replaced, but the state holds no "
                                   f"{key_w!r}.")
            edits[path] = BaseSwap(original=state_dict.pop(key_w))
        out[name] = (InitRecord(init=meta["init"], spec=meta["spec"], edits=edits), config)
    for key in [] if partial else [k for k in state_dict if k.startswith(head)]:
        raise AdapterError(f"{key}: a lorakit init tensor of no recorded adapter ({', '.join(names) or 'none'}).")
    return out
