"""What the data-driven inits share: the adapted linear layers of an adapter, checked batches, one pass of the
data with per-module hooks (weight gradients for LoRA-GA / LoRA-SB, layer inputs for EVA / CorDA), and the
checks that name the module whose factorisation failed.

Every init here computes all factors first and writes the adapter and the base only after every module passed,
so a failure (missing data, a NaN, a rank-deficient matrix) leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.delta import Delta, LayerInfo, oriented_weight
from ..core.errors import AdapterError
from ..core.inits import BaseEdit, add_low_rank_to_base_weight
from ..core.layer import AdapterLayer
from ..core.model import adapter_layers, disable_adapters
from ..core.registry import list_methods
from ..methods.lora import LoraConfig


@dataclass
class BaseTarget:
    """A linear layer an adapter will adapt, before it is attached: host path, the layer, its LayerInfo."""

    path: str
    base: nn.Module
    info: LayerInfo


def base_targets(targets: Sequence[tuple[str, nn.Module, LayerInfo]]) -> list[BaseTarget]:
    """The linear ones of ``add_adapter``'s ``(path, base layer, LayerInfo)`` targets (``Init.estimate``'s)."""
    return [BaseTarget(path, base, info) for path, base, info in targets if info.kind == "linear"]


@dataclass
class Target:
    """One adapted linear layer: host path, wrapper, the adapter's delta."""

    path: str
    layer: AdapterLayer
    delta: Delta

    @property
    def base(self) -> nn.Module:
        return self.layer.base_layer

    @property
    def info(self) -> LayerInfo:
        return self.layer.info

    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), float32 (a view cast, not the stored tensor)."""
        return oriented_weight(self.layer.base_layer, self.layer.info).float()


def config_is(config_cls: type, kind: str) -> Callable[[Any], str | None]:
    """An ``Init.fits`` check: the adapter's config must be a ``config_cls`` (``kind`` says what such adapters
    are); the reason names the registered methods whose configs are."""
    def fits(config: Any) -> str | None:
        if isinstance(config, config_cls):
            return None
        names = sorted(m.name for m in list_methods() if issubclass(m.config_cls, config_cls))
        return f"it works on {kind} ({', '.join(names)}); use one of those methods or another init."
    return fits


# ``Init.fits`` of the inits that set or move B A factors (linear_targets / split_base_weight need them)
lora_style = config_is(LoraConfig, "LoRA-style B·A adapters")


def writable_units(delta: Delta, path: str, init: str) -> Any:
    """``delta.units()`` when its ``A`` and ``B`` are the delta's own parameters, so that writing them sets the
    delta to ``s·B A``. AdapterError otherwise: a delta without units, or one whose units are computed
    (B·M·A methods report ``A = M A``: writing that copy would change nothing while an init moved ``s·B A``
    out of the base)."""
    try:
        units = delta.units()
    except NotImplementedError:
        units = None
    if units is None or not (isinstance(units.A, nn.Parameter) and isinstance(units.B, nn.Parameter)):
        raise AdapterError(f"init {init!r}: {type(delta).__name__} at {path!r} has no trainable B A factors; "
                           "this init works on LoRA-style adapters (lora, rslora, dora).")
    return units


def method_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer, Delta]]:
    """``(path, layer, delta)`` of each of ``adapter_name``'s own deltas in module order: not those its config adds
    beside them (``Delta.extra``: trainable token rows, which an init leaves as they are, as PEFT does)."""
    return [(path, layer, layer.adapters[adapter_name]) for path, layer in adapter_layers(model)
            if adapter_name in layer.adapters and not layer.adapters[adapter_name].extra]


def linear_targets(model: nn.Module, adapter_name: str, init: str, need_units: bool = True) -> list[Target]:
    """The adapter's linear deltas in module order. ``need_units``: each must expose writable rank-one units
    (``B A``: LoRA, rsLoRA, DoRA); AdapterError names the first that does not."""
    out = []
    for path, layer, delta in method_layers(model, adapter_name):
        if layer.info.kind != "linear":
            continue
        if need_units:
            writable_units(delta, path, init)
        out.append(Target(path, layer, delta))
    if not out:
        raise AdapterError(f"init {init!r}: adapter {adapter_name!r} has no linear layers to initialise.")
    return out


def check_batches(batches: Sequence[Mapping[str, Any]] | None, init: str, need: int | None = None,
                  labels: bool = False) -> list[Mapping[str, Any]]:
    """The batches as a list; AdapterError when there are none, fewer than ``need``, or (``labels``) one has no
    ``labels`` (a loss is needed for gradients)."""
    batches = list(batches or [])
    if not batches:
        raise AdapterError(f"init {init!r} is data-driven and got no batches; pass a few model-input dicts.")
    if need is not None and len(batches) < need:
        raise AdapterError(f"init {init!r} needs {need} batches (num_batches={need}) but the batch iterator ended "
                           f"after {len(batches)}; pass more batches or lower num_batches.")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or "input_ids" not in b and "inputs_embeds" not in b:
            raise AdapterError(f"init {init!r}: batch {i} is not a model-input dict with input_ids (got "
                               f"{type(b).__name__}{' keys ' + str(sorted(b)) if isinstance(b, Mapping) else ''}).")
        if labels and "labels" not in b:
            raise AdapterError(f"init {init!r} needs a loss: batch {i} has no 'labels' (keys {sorted(b)}).")
    return batches


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def weight_gradients(model: nn.Module, targets: Sequence[Target | BaseTarget], batches: list[Mapping[str, Any]],
                     init: str, *, per_sample: bool = False) -> dict[str, torch.Tensor]:
    """``∂L/∂W`` of every target's base weight, averaged over the batches, as (out, in) float32.

    The base model runs (adapters disabled) in train mode, with ``requires_grad`` on the target weights only.
    A post-accumulate hook on each weight moves its fresh ``.grad`` into that module's float32 accumulator and
    drops it, so no other parameter ever holds a gradient and each module holds one running sum. Everything
    (``requires_grad``, ``.grad``, train/eval mode) is restored afterwards, also on error.
    ``per_sample``: scale each batch's loss by 1/batch size first (LoRA-SB's ``outputs.loss / samples``).
    AdapterError naming the first target whose stored weight is not floating point (4-bit codes take no gradient).
    """
    weights = {t.path: t.base.weight for t in targets}
    for path, w in weights.items():  # before anything is touched: the model stays as it was
        if not w.dtype.is_floating_point:
            raise AdapterError(f"init {init!r} needs the gradient of each base weight, but module {path!r} stores its "
                               f"weight as {w.dtype} codes (a quantised base, e.g. 4-bit NF4), which take no gradient; "
                               "run the init on the full-precision base, then quantise it.")
    acc: dict[str, torch.Tensor] = {}

    def hook_for(path: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            if path in acc:
                acc[path] += g
            else:
                acc[path] = g  # the first gradient becomes the accumulator: no copy
            p.grad = None
        return hook

    requires = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = []
    device = _device(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for path, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(path)))
        model.train()
        with torch.enable_grad(), disable_adapters(model):
            for i, batch in enumerate(batches):
                # only the loss survives the forward: the output's logits and KV cache are freed before backward
                loss = getattr(model(**_to(batch, device)), "loss", None)
                if loss is None:
                    raise AdapterError(f"init {init!r}: the model returned no loss for batch {i}; give batches with labels.")
                if per_sample:
                    loss = loss / len(batch["input_ids"])
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(requires[id(p)])
        for w in weights.values():
            w.grad = None
        model.train(was_training)
    missing = [t.path for t in targets if t.path not in acc]
    if missing:
        raise AdapterError(f"init {init!r}: module {missing[0]!r} got no gradient (is it on the loss's path?).")
    grads = {}
    for t in targets:  # the mean in place: one (out, in) buffer per module, never two
        g = acc.pop(t.path).div_(len(batches))
        grads[t.path] = g.T if t.info.fan_in_fan_out else g  # (out, in)
    return grads


def check_factorisable(path: str, matrix: torch.Tensor, init: str, what: str) -> None:
    """AdapterError naming the module when ``matrix`` has a NaN/inf (SVD of it would fail or be garbage)."""
    # a NaN/inf anywhere makes the sum non-finite: one reduction instead of a bool copy of the matrix, and the
    # exact check only when the sum says so (finite entries whose sum overflows are not an error)
    if not torch.isfinite(matrix.sum()) and not torch.isfinite(matrix).all():
        raise AdapterError(f"init {init!r}: the {what} of module {path!r} has NaN/inf entries, so it cannot be "
                           "factorised; check the batches and the base weights (left unchanged).")


def target_gradients(model: nn.Module, targets: Sequence[Target | BaseTarget],
                     batches: Sequence[Mapping[str, Any]] | None, init: str, num_batches: int | None = None, *,
                     per_sample: bool = False, estimate: dict[str, torch.Tensor] | None = None,
                     adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``{path: mean ∂L/∂W (out, in) float32}`` of ``targets`` for a gradient init (LoRA-GA, LoRA-SB).

    ``estimate`` None: check the batches (``num_batches`` exactly when given, each with labels) and run
    :func:`weight_gradients` now. Else ``estimate`` is the result of an earlier call made on the base model before
    adapter ``adapter_name`` was attached (``Init.estimate``); AdapterError when it is for other modules."""
    if estimate is None:
        batches = check_batches(batches, init, num_batches, labels=True)[:num_batches]
        return weight_gradients(model, targets, batches, init, per_sample=per_sample)
    if set(estimate) != {t.path for t in targets}:
        raise AdapterError(f"init {init!r}: the estimated gradients are for other modules than adapter "
                           f"{adapter_name!r} adapts; run the init again.")
    return estimate


def check_rank_fits(path: str, r: int, weight_shape: Sequence[int], init: str) -> None:
    """AdapterError naming the module when its rank ``r`` exceeds ``min(out, in)`` of its (out, in) weight: an
    init that takes r components of the weight's SVD / QR (PiSSA, OLoRA, CorDA) finds only that many."""
    k = min(weight_shape)
    if r > k:
        raise AdapterError(f"init {init!r}: r={r} at module {path!r} exceeds min(out, in) = {k} of its "
                           f"{weight_shape[0]}x{weight_shape[1]} weight, which has only {k} components to take; "
                           "lower r there (rank_pattern) or leave the module out (model left unchanged).")


def check_rank(path: str, S: torch.Tensor, k: int, init: str, what: str, rtol: float = 1e-6) -> None:
    """AdapterError naming the module when the {what} has fewer than ``k`` non-negligible singular values."""
    top = float(S[0]) if S.numel() else 0.0
    if S.numel() < k or top == 0.0 or float(S[k - 1]) <= rtol * top:
        rank = int((S > rtol * top).sum()) if top > 0 else 0
        raise AdapterError(f"init {init!r}: the {what} of module {path!r} has rank {rank} < {k} needed for this "
                           "adapter's rank; give more (or more varied) batches, or lower r (model left unchanged).")


def move_into_adapter(layer: AdapterLayer, units: Any, A: torch.Tensor, B: torch.Tensor, *,
                      record: bool = True) -> BaseEdit | None:
    """Write ``A`` (r, in) and ``B`` (out, r) into the adapter's units and subtract ``s·B A`` from the base weight
    in place (no (out, in) temporary on a float32 base); returns the recorded edit ``W_now = W_orig + s·(−B) A``.

    ``A`` and ``B`` become the record (float32; ``B`` negated in place when already float32), so pass tensors
    the caller owns and no longer needs, not views of the adapter's parameters. A view into a larger factor
    (e.g. rows of the SVD's V) is copied, so the record never keeps the whole factor alive.
    ``record=False`` (only when the adapter holds ``A`` and ``B`` exactly, i.e. in their dtype): keep nothing and
    return None; take the record with :func:`adapter_record` after the last module, so that the records of the
    modules done do not stay alive through the factorisations of the others (they would add to its peak memory)."""
    units.A.copy_(A)
    units.B.copy_(B)
    if not record:
        add_low_rank_to_base_weight(layer, B, A, -units.scaling)  # the same sum as the record's s·(−B)A, bit for bit
        return None
    edit = BaseEdit(A=_owned_float(A), B=_owned_float(B).neg_(), scaling=units.scaling)
    edit.add_to(layer)
    return edit


def adapter_record(units: Any) -> BaseEdit:
    """The record of a ``move_into_adapter(..., record=False)``, from the adapter's A and B (which still hold the
    factors exactly): float32 copies, ``W_now = W_orig + s·(−B) A``."""
    return BaseEdit(A=units.A.detach().to(torch.float32, copy=True),
                    B=units.B.detach().to(torch.float32, copy=True).neg_(), scaling=units.scaling)


def _owned_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 holding only its own elements: a view into a larger storage is copied."""
    t = t.float()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
