"""The delta protocol: one adapter's contribution ``Δ(x)`` at one layer, ``y = base(x) + Δ(x)``.

The core never looks inside a delta. It asks it for its output, its weight (for merging and export) and,
where the method has them, its rank-one units ``Δ = s·Σ_i b_i a_iᵀ`` (so rank-wise methods — SMoRA,
DyLoRA, SoRA, LoRA-LEGO — work on units and per-unit gates instead of re-implementing LoRA).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layers store the weight transposed (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, this only guards odd installs
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of an ``nn.Conv1d/2d/3d`` base layer (``dims`` = 1, 2, 3), as its constructor took it.

    ``padding`` is a tuple of ints or torch's "same" / "valid"; ``padding_mode`` is "zeros", "reflect",
    "replicate" or "circular" (non-zero modes pad the input first, as ``nn.Conv2d._conv_forward`` does).
    """

    dims: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    def padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | str]:
        """(input, padding for ``F.convNd``): non-"zeros" padding modes pad ``x`` here and convolve unpadded."""
        if self.padding_mode == "zeros":
            return x, self.padding
        if self.padding == "valid":
            return x, 0
        pads: list[int] = []  # F.pad wants the last dim first: (left_last, right_last, left_prev, ...)
        for i in reversed(range(self.dims)):
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [self.padding[i], self.padding[i]]
        return F.pad(x, pads, mode=self.padding_mode), 0

    def conv(self, x: torch.Tensor, weight: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
        """``F.convNd(x, weight)`` with this layer's stride, padding, dilation (and padding mode), given groups."""
        x, padding = self.padded(x)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, weight, None, self.stride, padding, self.dilation, groups)


@dataclass(frozen=True)
class LayerInfo:
    """What a delta needs to know about the base layer it adapts.

    ``kind`` is ``"linear"`` (nn.Linear, Conv1D), ``"embedding"`` or ``"conv"`` (nn.Conv1d/2d/3d). ``fan_in_fan_out``
    means the base weight is stored as (in, out) — Conv1D and nn.Embedding — so the core transposes when merging.
    For convolutions ``in_features`` / ``out_features`` are the channel counts, ``conv`` holds the geometry, and
    the core's "(out, in)" weight is the kernel flattened to (out, in/groups · Πkernel_size).
    """

    kind: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    conv: ConvSpec | None = None


# The layer types each built-in layer kind covers (error messages name the types a method supports).
KIND_LAYERS = {"linear": "nn.Linear, transformers Conv1D", "embedding": "nn.Embedding",
               "conv": "nn.Conv1d, nn.Conv2d, nn.Conv3d"}
SUPPORTED_LAYERS = ", ".join(KIND_LAYERS.values())

# Extra layer kinds (e.g. whole feed-forward blocks for FFN-level mixtures) register a describer here.
_KIND_DESCRIBERS: list = []


def register_layer_kind(describe) -> None:
    """Add ``describe(module) -> LayerInfo | None`` for a new kind of adaptable module (checked after the built-ins)."""
    if describe not in _KIND_DESCRIBERS:
        _KIND_DESCRIBERS.append(describe)


def describe_layer(module: nn.Module) -> LayerInfo | None:
    """LayerInfo for a supported base layer, else None. Runs the registered host preparers on ``module`` first
    (:func:`register_host_preparer`): every path that adapts, wraps, initialises or serves a layer describes it."""
    for prepare in _HOST_PREPARERS:
        prepare(module)
    info = _describe_builtin(module)
    if info is None:
        for describe in _KIND_DESCRIBERS:
            info = describe(module)
            if info is not None:
                break
    return info


def _describe_builtin(module: nn.Module) -> LayerInfo | None:
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features, False)
    if Conv1D and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape  # Conv1D weight: (nx, nf) = (in, out)
        return LayerInfo("linear", in_f, out_f, True)
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim, True)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # not ConvTranspose*: it is not a subclass of these
        spec = ConvSpec(dims=module.weight.dim() - 2, kernel_size=tuple(module.kernel_size), stride=tuple(module.stride),
                        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
                        dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode)
        return LayerInfo("conv", module.in_channels, module.out_channels, False, spec)
    return None


# Layer kinds that need a one-time setup before lorakit runs them register ``prepare(module) -> None`` here; it must
# be cheap, do nothing for modules that hold no layer of its kind, and look inside the module (a described module
# may be a block: FFN mixtures, gamma-MoD). bitsandbytes 4-bit layers (lorakit.quantize) use it
# so that a model quantized by transformers outside lorakit gets the CPU dequantization check and the QLoRA layout
# the moment an adapter meets one of its layers (lorakit.quantize.nf4.prepare_4bit_host).
_HOST_PREPARERS: list = []


def register_host_preparer(prepare) -> None:
    """Add ``prepare(module) -> None``, run by :func:`describe_layer` on every layer it describes (once per call)."""
    if prepare not in _HOST_PREPARERS:
        _HOST_PREPARERS.append(prepare)


def embedding_scaled(out: torch.Tensor, embed_scale, weight_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out`` (..., dim) times a scaled embedding's output scale ``embed_scale`` (the layer's attribute: Gemma's
    0-d tensor, BioGPT's / BART's Python float); ``out`` as it is for None. Adapter outputs on such a layer are
    scaled so too (PEFT's ``_get_embed_scale`` takes both kinds, peft/tuners/tuners_utils.py 0.21.2 lines
    1916-1929). ``weight_dtype``: a float scale is first rounded to it, as PEFT makes it a tensor of the base
    weight's dtype (a LoRA delta then matches PEFT's bit for bit on half-precision bases); None: multiplied as the
    layer's own forward does (trainable token rows, which replace the layer's output rows)."""
    if isinstance(embed_scale, torch.Tensor):
        return out * embed_scale.to(out.dtype)
    if isinstance(embed_scale, (int, float)) and not isinstance(embed_scale, bool):
        if weight_dtype is None:
            return out * embed_scale
        return out * torch.tensor(embed_scale, dtype=weight_dtype, device=out.device).to(out.dtype)
    return out


def describe_kinds(kinds: Iterable[str]) -> str:
    """The layer types a method with these ``layer_kinds`` adapts, e.g. "nn.Linear, transformers Conv1D"."""
    return "; ".join(KIND_LAYERS.get(k, f"{k} blocks") for k in kinds)


# Quantized bases (e.g. bitsandbytes 4-bit, lorakit.quantize) register ``dequantize(layer) -> (out, in) float
# tensor | None`` here, so deltas that read the base weight (DoRA, inits) see real values, not packed codes.
_DEQUANTIZERS: list = []


def register_dequantizer(dequantize) -> None:
    """Add ``dequantize(base_layer) -> Tensor (out, in) | None`` for a quantized layer kind."""
    if dequantize not in _DEQUANTIZERS:
        _DEQUANTIZERS.append(dequantize)


def is_quantized(base_layer: nn.Module) -> bool:
    """True when the base layer stores its weight as integer codes (a quantized base: read-only for merges)."""
    w = getattr(base_layer, "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_floating_point()


def oriented_weight(base_layer: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The base weight as (out, in), whatever the layer's storage layout; a quantized weight is dequantized
    (float32, a copy). Raises TypeError for a quantized layer kind no dequantizer knows."""
    if is_quantized(base_layer):
        for dequantize in _DEQUANTIZERS:
            w = dequantize(base_layer)
            if w is not None:
                return w
        raise TypeError(f"{type(base_layer).__name__} stores a {base_layer.weight.dtype} weight that no registered "
                        f"dequantizer reads (lorakit.core.delta.register_dequantizer)")
    return orient(base_layer.weight, info)


def orient(w: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A weight in the base layer's stored layout as the (out, in) matrix the core merges into."""
    if info.conv is not None:
        return w.reshape(w.shape[0], -1)  # (out, in/groups, *kernel) -> (out, in/groups · Πkernel)
    return w.T if info.fan_in_fan_out else w


def stored_layout(weight_oi: torch.Tensor, info: LayerInfo, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`orient`: an (out, in) matrix back to the stored ``shape``."""
    if info.conv is not None:
        return weight_oi.reshape(shape)
    return weight_oi.T if info.fan_in_fan_out else weight_oi


@dataclass
class MergeTerms:
    """How merging a delta changes the base: ``W' = row_scale ⊙ W + weight``, ``b' = b + bias``.

    Plain LoRA has ``row_scale=None`` (1). DoRA rescales rows. With several adapters merged the core
    combines terms additively, as the unmerged forward does, and inverts the combination to unmerge.
    All tensors are float32, weight as (out, in).
    """

    weight: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None  # (out,) ; multiplies rows of the *unmerged* base weight
    bias: torch.Tensor | None = None  # (out,)
    # (dim, index (k,), values): slices ``index`` along ``dim`` (0: rows, 1: columns) of the (out, in) weight are
    # replaced by ``values`` rather than added to (trainable token rows); the layer keeps the replaced originals
    replace: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def is_empty(self) -> bool:
        """True when merging these terms changes nothing (a delta that follows another one's write)."""
        return self.weight is None and self.row_scale is None and self.bias is None and self.replace is None


@dataclass
class RankUnits:
    """A delta as rank-one units: ``Δ = scaling · B @ A`` with ``A`` (r, in), ``B`` (out, r); ``dropout`` is what
    a ``plain_units`` delta applies to its input before A (None: nothing)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: nn.Module | None = None


_VALUES_FROM_FILE: ContextVar[bool] = ContextVar("lorakit_values_from_file", default=False)


@contextmanager
def values_from_file() -> Iterator[None]:
    """Deltas built inside this block take every tensor from a saved file right after (a loader, once the file's
    keys and shapes are checked): a build may then leave out computing initial values the file replaces (MiCA's SVD
    of the base weight, DoRA's initial norm), which would cost every load of such an adapter that work."""
    token = _VALUES_FROM_FILE.set(True)
    try:
        yield
    finally:
        _VALUES_FROM_FILE.reset(token)


def building_for_file() -> bool:
    """True inside :func:`values_from_file`: the initial values of a delta being built are overwritten from a file."""
    return _VALUES_FROM_FILE.get()


class Delta(nn.Module):
    """Base class of adapter deltas. Subclasses implement ``forward`` and ``delta_weight``.

    What trains: every parameter of an active adapter trains except those named by :meth:`frozen_names`
    (a delta's frozen parts stay ``nn.Parameter`` s, so they are saved, moved and cast like the rest, and can
    be unfrozen later). Tensors that are regenerated rather than learned or saved (e.g. NOLA's random bases,
    rebuilt from a seed in the config) are non-persistent buffers: ``register_buffer(name, t, persistent=False)``.
    """

    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    # Input-dependent deltas (mixtures) have no fixed ΔW: merging them into the base is refused.
    mergeable: ClassVar[bool] = True
    # True when forward(x) is exactly ``units().scaling · B A units().dropout(x)`` (plain LoRA): per-row mixed batches
    # can then stack units across adapters and run one gathered bmm instead of a loop over adapters.
    plain_units: ClassVar[bool] = False
    # A delta that computes the whole layer output itself (e.g. MixLoRA reusing the FFN's base projections
    # across experts) sets this and implements ``full_forward``; the wrapper then skips the base call.
    replaces_base: ClassVar[bool] = False
    # A delta whose forward reads state computed over the whole batch (X-LoRA's scalings from a scaling pass of every
    # row) sets this: it cannot serve only some rows of a mixed batch (train_concurrent trains such a job alone).
    whole_batch: ClassVar[bool] = False
    # A delta whose merge replaces slices of the weight (``MergeTerms.replace``) rather than adding to it: the layer
    # merges it alone (an addition and a replacement of the same rows have no order-free sum).
    merge_replaces: ClassVar[bool] = False
    # A delta that every module sharing its base weight (tied embeddings: lm_head is embed_tokens) also has, with the
    # same change: merging writes into the shared weight and keeps the tie, instead of untying (trainable tokens).
    keeps_tied_weights: ClassVar[bool] = False
    # A delta a config adds beside its method's own (``AdapterConfig.extra_deltas``: LoRA's trainable token rows):
    # inits, which set the method's factors (PiSSA, LoftQ, EVA, LoRA-GA ...), leave it as it is.
    extra: ClassVar[bool] = False

    def __init__(self, info: LayerInfo):
        super().__init__()
        self.info = info

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The additive term for this adapter, same shape and dtype as ``base_out``."""
        raise NotImplementedError

    def full_forward(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The layer's whole output with this adapter (only for ``replaces_base`` deltas)."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """Optional: ``base_layer(x) + Δ(x)`` in one pass, or None to decline. Called only when this adapter is the
        layer's single active, unmerged adapter, with no routing context and no extra call arguments; a delta whose
        ΔW is cheaper to add to the weight than to apply separately (a full-rank update) computes
        ``x (W + ΔW)ᵀ + b`` here, so the input gradient is one matmul instead of two. Same value as the unfused
        path, float rounding apart."""
        return None

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``acc + Δ(x)``, added at the adapter's precision and rounded once to ``acc``'s dtype, as PEFT's layers add
        (``result = result + delta``, then ``result.to(previous_dtype)``; e.g. peft/tuners/lora/layer.py
        Linear.forward). A float32 adapter on a bf16 / fp16 base (``autocast_adapter_dtype``) would otherwise round
        Δ to the base dtype and then the sum again: one ulp off PEFT per layer. Δ runs with ``base_out`` widened
        (exactly), so it returns the wide dtype. Methods override this to fuse the add into their last matmul."""
        own = next(self.parameters(), None)
        wide = acc.dtype if own is None else torch.promote_types(acc.dtype, own.dtype)
        if wide == acc.dtype:
            return acc + self(x, base_out, base_layer)
        return (acc.to(wide) + self(x, base_out.to(wide), base_layer)).to(acc.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as (out, in), in float32."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def merge_error(self) -> str | None:
        """Why this delta cannot be folded into its base weight (completing "adapter NAME ..."), None if it can."""
        if self.mergeable:
            return None
        return (f"is input-dependent ({type(self).__name__}) and cannot be merged into the base weights; export or "
                f"serve it unmerged")

    def conflict(self, other: "Delta") -> str | None:
        """Why this delta cannot be active together with ``other`` on the same layer (completing "adapters A and B
        ..."), None if it can (default: deltas add up)."""
        return None

    def merge_terms(self, base_weight: torch.Tensor) -> MergeTerms:
        """Terms for merging into the (unmerged, float32, (out, in)) base weight; may cache what unmerge needs."""
        return MergeTerms(weight=self.delta_weight().float(), bias=self.delta_bias())

    def unmerge_terms(self) -> MergeTerms:
        """The terms used at merge time, rebuilt from what ``merge_terms`` cached."""
        return MergeTerms(weight=self.delta_weight().float(), bias=self.delta_bias())

    def frozen_names(self) -> Iterable[str]:
        """Names of this delta's parameters (as in ``self.named_parameters()``) that must not train.

        Default: none. The answer may change over time (staged training, gradual freezing); the core reads it
        whenever it turns training on (``set_adapter``, ``lorakit.refresh_trainable``), so a method that
        changes it calls ``lorakit.refresh_trainable(model)`` afterwards. Unknown names raise AdapterError there.
        """
        return ()

    def units(self) -> RankUnits:
        raise NotImplementedError(f"{type(self).__name__} does not expose rank-one units")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32
