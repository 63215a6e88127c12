"""LoRA and DoRA on convolutions (nn.Conv1d, nn.Conv2d, nn.Conv3d), PEFT's layout and arithmetic.

The low-rank update of a k×k convolution ``W ∈ R^{out×in×k×k}`` is a k×k convolution to ``r`` channels followed by
a 1×1 convolution back to ``out`` channels (LoRA, arXiv:2106.09685, applied to convolutions as kohya-ss and PEFT do):

    Δ(x) = s · conv_{1×1}(conv_{k×k}(dropout(x); A); B),   A: (r, in, k, k) with the base's stride / padding / dilation,
                                                          B: (out, r/groups, 1, 1) with the base's groups.

With ``groups == 1`` this is the convolution with the kernel ``ΔW[o, i, ...] = s · Σ_j B[o, j] A[j, i, ...]``, i.e.
``ΔW = s · B A`` on the kernels flattened to (out, r) and (r, in·Πk) — what merging adds to the base weight
(PEFT ``get_delta_weight``, peft/tuners/lora/layer.py:1755-1797 in peft 0.21.2, computes the same tensor as a
convolution of Aᵀ with B). With ``groups > 1`` the update is a dense kernel that the grouped base weight cannot
hold, so merging is refused (as PEFT, layer.py:1682-1684); the rank must be divisible by ``groups`` (layer.py:1565).

DoRA (arXiv:2402.09353) on a convolution normalises per output channel over all other kernel dimensions:
``m`` has shape (1, out, 1, …) (PEFT's ``_DoraConvNdLayer.get_weight_norm``, peft/tuners/lora/dora.py:207-213),
``Δ(x) = (m/n − 1) ⊙ (W ⋆ x) + (m/n) ⊙ s·B⋆A⋆x`` with ``n = ‖W + s·BA‖`` detached (dora.py:223-265).

Where lorakit differs from PEFT 0.21.2: lora_A also takes the base layer's ``dilation`` and ``padding_mode``
(PEFT's lora_A uses neither, layer.py:1625, so on a dilated convolution its delta has another output size and
on a non-"zeros" padding mode its merged weights differ from its unmerged outputs). Ordinary convolutions
(dilation 1, zero padding: every diffusers UNet and Whisper convolution) give PEFT's outputs and files exactly.
Data-driven and SVD inits (PiSSA, OLoRA, LoRA-GA, EVA...) are for linear layers: requesting one on a
convolution raises ConfigError naming the module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.delta import Delta, LayerInfo, MergeTerms, RankUnits
from ..core.errors import ConfigError, TargetError
from .lora import FACTOR_ONLY_INITS, DoraLinear, LoraConfig, LoraLinear, initial_norm

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LoraConv(LoraLinear):
    """``Δ(x) = s · lora_B(lora_A(dropout(x)))`` on an nn.Conv1d / Conv2d / Conv3d base (PEFT's ``_ConvNd``).

    Parameters (PEFT's names and shapes): ``lora_A.weight`` (r, in, *kernel), ``lora_B.weight``
    (out, r/groups, 1, …), ``lora_B.bias`` (out,) with ``lora_bias``. Input (N, in, *spatial) → (N, out, *spatial').
    Raises ConfigError for a rank not divisible by the base's groups, or a registered init (PiSSA, ...).
    """

    layer_kinds = ("conv",)
    plain_units = True

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module | None = None, path: str = ""):
        Delta.__init__(self, info)  # not LoraLinear's: it would build nn.Linear factors
        spec = info.conv
        if spec is None:
            raise TargetError(f"LoraConv needs a convolution base layer, got layer kind {info.kind!r}")
        where = f"module {path!r} ({_CONVS[spec.dims].__name__}, groups={spec.groups})"
        if config.r % spec.groups:
            raise ConfigError(f"{where}: r={config.r} is not divisible by groups={spec.groups} (lora_B is grouped as "
                              f"the base, as in PEFT); choose r a multiple of {spec.groups} or exclude this module.")
        if config.requested_init() is not None or config.init_lora_weights in FACTOR_ONLY_INITS:
            raise ConfigError(f"{where}: init_lora_weights={config.init_lora_weights!r} initialises linear layers "
                              f"only; use True or 'gaussian' for convolutions, or exclude this module.")
        self.r = config.r
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        conv = _CONVS[spec.dims]
        ones = (1,) * spec.dims
        self.lora_A = conv(info.in_features, config.r, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                           bias=False, padding_mode=spec.padding_mode)
        self.lora_B = conv(config.r, info.out_features, ones, ones, groups=spec.groups, bias=config.lora_bias)
        self.reset_parameters(config.init_lora_weights)
        if config.lora_bias:
            self.plain_units = False  # units carry no bias: per-row stacking would drop it

    # (reset_parameters, lora_out, forward and delta_bias are LoraLinear's: the same calls on conv modules)
    accumulate = Delta.accumulate  # LoraLinear's fused addmm is for (…, in) inputs, not (N, in, *spatial)

    def _dense_B(self) -> torch.Tensor:
        """lora_B as an (out, r) matrix; with groups > 1 the block-diagonal matrix the grouped 1×1 conv applies."""
        w = self.lora_B.weight.reshape(self.info.out_features, -1)  # (out, r/groups)
        groups = self.info.conv.groups
        if groups == 1:
            return w
        per = self.r // groups
        blocks = w.reshape(groups, -1, per)  # (groups, out/groups, r/groups)
        return torch.block_diag(*blocks.unbind(0))  # (out, r)

    def units(self) -> RankUnits:
        # A (r, in·Πkernel), B (out, r): rank-one units of the update on the flattened kernels
        return RankUnits(A=self.lora_A.weight.reshape(self.r, -1), B=self._dense_B(), scaling=self.scaling,
                         dropout=self.lora_dropout)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·BA as (out, in·Πkernel), float32: the base kernel flattened (groups == 1; see merge_error)."""
        return (self._dense_B().float() @ self.lora_A.weight.reshape(self.r, -1).float()) * self.scaling

    def merge_error(self) -> str | None:
        if self.info.conv.groups == 1:
            return None
        return (f"is on a convolution with groups={self.info.conv.groups}: its update is a dense kernel that the "
                f"grouped base weight cannot hold, so it cannot be merged (as in PEFT); use it unmerged")


class DoraConv(LoraConv):
    """DoRA on a convolution: a learned magnitude per output channel, ``lora_magnitude_vector`` (1, out, 1, …)."""

    plain_units = False

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module, path: str = ""):
        super().__init__(info, config, base_layer, path)
        if info.conv.groups > 1:
            raise ConfigError(f"module {path!r}: DoRA on a convolution with groups={info.conv.groups} is not "
                              f"supported (PEFT's DoRA reshapes lora_B as if ungrouped); use plain LoRA there or "
                              f"exclude the module.")
        with torch.no_grad():
            norm = initial_norm(base_layer.weight, self.lora_A.weight,
                                lambda weight: self._norm(weight, self.delta_weight()))
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(1, -1, *(1,) * info.conv.dims))  # (1, out, 1, ...)
        self._merge_scale: torch.Tensor | None = None

    def _norm(self, weight: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ per output channel, (out,): the norm over every other kernel dimension."""
        return torch.linalg.norm(weight.reshape(weight.shape[0], -1) + delta_oi, dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        x = x.to(dtype)
        weight = base_layer.weight.to(dtype)
        lora_weight = (self._dense_B() @ self.lora_A.weight.reshape(self.r, -1)).detach()  # (out, in·Πk)
        norm = self._norm(weight, self.scaling * lora_weight).detach()  # detached: DoRA paper §4.3
        view = (1, -1) + (1,) * self.info.conv.dims
        scale = self.lora_magnitude_vector / norm.reshape(view)  # (1, out, 1, ...)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)  # PEFT recomputes the base term on the dropped-out input (variants.py:452-455)
            base_term = self.info.conv.conv(x, weight, groups=self.info.conv.groups)
        else:
            bias = getattr(base_layer, "bias", None)
            base_term = ((base_out - bias.reshape(view)).to(bias.dtype) if bias is not None else base_out).to(dtype)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        return ((scale - 1) * base_term + scale * lora).to(base_out.dtype)

    def merge_terms(self, base_weight: torch.Tensor) -> MergeTerms:
        dw = self.delta_weight()
        self._merge_scale = (self.lora_magnitude_vector.float().reshape(-1) / self._norm(base_weight, dw)).detach()
        return self._terms(self._merge_scale, dw)

    unmerge_terms = DoraLinear.unmerge_terms  # the cached per-channel scale, as for linear layers
    _terms = DoraLinear._terms
