"""RandLoRA — "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", Albert et al., arXiv:2502.00987.

A full-rank update built from frozen random low-rank bases shared by every adapted layer, with only diagonal
scalings trained:

    ΔW = s · Σ_{b=1..n} B_b Λ_b A Γ_b,    n = ⌈min(in, out) / r⌉  (so n·r ≥ min(in, out): full rank),

``A ∈ R^{r×d_min}`` one shared random matrix, ``B_b ∈ R^{d_max×r}`` n shared random matrices, ``Λ_b`` = diag of
``randlora_lambda[:, b]`` (r), ``Γ_b`` = diag of ``randlora_gamma[b]`` (d_min), ``s = randlora_alpha / r``.
The scaled A sits on the layer's smaller side: ``ΔW = s·B̄ Ā`` when ``in ≤ out`` and ``s·Āᵀ B̄ᵀ`` otherwise, with
``Ā = (λ[:, :, None] · A · γ[None]).reshape(r·n, d_min)`` and ``B̄ = B.reshape(d_max, n·r)``. The two flattens
order (rank, basis) differently; that fixed pairing of B̄'s columns with Ā's rows is the reference's and is kept.

Follows HF PEFT's port (``peft/tuners/randlora/model.py`` ``_init_randlora_A_randlora_B`` and ``layer.py``
``get_scaled_bases``), which is what the official repo ships, so files are interchangeable with PEFT:

- the shared bases are sized by the largest ``out`` and ``in`` over the targeted layers and drawn with
  ``torch.Generator().manual_seed(projection_prng_key)``: A = Kaiming-uniform(a=√5) of shape (r, 1, d_min), then
  for each basis Kaiming-uniform (d_max, 1, r), concatenated to B (d_max, n, r); both drawn in bfloat16 (PEFT's
  ``_kaiming_init`` on bf16-capable machines) and divided by their own std. ``sparse`` / ``very_sparse``: ternary
  {-1, 0, 1} bases from ``torch.rand`` thresholds (probability 1/(2·s) each sign, s = 3 or √d_min), std-normalised;
- each layer uses the slices ``A[:, :, :d_min]`` and ``B[:d_max, :n]`` of the shared tensors;
- init: ``λ = 0``, ``γ = 1 / max(n, d_min)`` ⇒ ΔW = 0 (``init_weights=False``: λ ~ N(0, 1), a non-zero start).

The bases are never saved by lorakit (non-persistent buffers, rebuilt from ``projection_prng_key``); lorakit
writes ``save_projection: false`` so PEFT regenerates them too. PEFT's own files carry the bases (per layer and
as ``base_model.randlora_A/B``); lorakit skips those keys on load (``Method.regenerated_keys``), the test checks
they equal the regenerated ones. Trainable parameters per layer: ``n·(r + d_min)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ANY_VALUE, AdapterConfig, check_dropout, check_positive, check_positive_ints, field_error
from ..core.delta import Delta, LayerInfo, describe_layer
from ..core.errors import AdapterError, TargetError
from ..core.model import unsupported_target
from ..core.registry import get_method, register_method
from ..core.targeting import iter_host_modules, select_targets


@dataclass
class RandLoraConfig(AdapterConfig):
    """PEFT's ``RandLoraConfig`` fields. ``r``: rank of each random basis (smaller r ⇒ more bases ⇒ more trained
    parameters); ``randlora_alpha``: s = α / r; ``projection_prng_key``: seed of the shared bases.

    - ``randlora_dropout``: dropout on the layer input before the update.
    - ``sparse`` / ``very_sparse``: ternary {-1, 0, 1} bases (each sign with probability 1/(2·s), s = 3 or √d_min)
      instead of Kaiming-uniform ones, as PEFT draws them.
    - ``init_weights``: True: λ = 0, so the update starts at zero; False: λ ~ N(0, 1), a non-zero start."""

    foreign_fields = {"fan_in_fan_out": ANY_VALUE, "bias": "none", "save_projection": ANY_VALUE}

    r: int = 32
    randlora_alpha: float = 640
    randlora_dropout: float = 0.0
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        check_positive(self, "randlora_alpha", finite=True, note=" (the update is scaled by randlora_alpha / r)")
        check_dropout(self, "randlora_dropout")
        check_positive(self, "randlora_alpha", finite=True)
        if self.sparse and self.very_sparse:
            raise field_error(self, "very_sparse", " and sparse are both set; set at most one of them.")

    @property
    def scaling(self) -> float:
        return self.randlora_alpha / self.r


def num_bases(in_features: int, out_features: int, r: int) -> int:
    return math.ceil(min(in_features, out_features) / r)


@lru_cache(maxsize=8)
def shared_bases(seed: int, r: int, max_dim: int, min_dim: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases ``A`` (r, 1, d_min) and ``B`` (d_max, n, r), float32, as PEFT draws them. Always on the CPU,
    whatever default device the caller set: a build under ``torch.device("meta")`` (a loader sizing a file's tensors)
    cached meta bases here, which every later build of those sizes then failed to copy."""
    with torch.device("cpu"):
        return _draw_bases(seed, r, max_dim, min_dim, kind)


def _draw_bases(seed: int, r: int, max_dim: int, min_dim: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = num_bases(min_dim, min_dim, r)
    if kind == "dense":
        def kaiming(shape):
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        A = kaiming((r, 1, min_dim))
        B = torch.cat([kaiming((max_dim, 1, r)) for _ in range(n)], dim=1)
    else:
        sparsity = 3.0 if kind == "sparse" else math.sqrt(min_dim)
        A, B = (torch.rand(shape, generator=gen) for shape in ((r, 1, min_dim), (max_dim, n, r)))
        A, B = (torch.where(t < 1 / (2 * sparsity), -1.0, torch.where(t > 1 - 1 / (2 * sparsity), 1.0, 0.0))
                for t in (A, B))
    return (A / A.std()).float(), (B / B.std()).float()


class RandLoraLinear(Delta):
    """``Δ(x) = s · x Wᵀ`` with ``W`` assembled from the sliced shared bases and the trained λ (r, n), γ (n, d_min)."""

    def __init__(self, info: LayerInfo, config: RandLoraConfig, bases: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(info)
        self.r, self.scaling = config.r, config.scaling
        self.min_dim, self.max_dim = sorted((info.in_features, info.out_features))
        self.n = num_bases(info.in_features, info.out_features, config.r)
        A, B = bases
        if A.shape[-1] < self.min_dim or B.shape[0] < self.max_dim or B.shape[1] < self.n:
            raise TargetError(f"RandLoRA bases {tuple(A.shape)}/{tuple(B.shape)} are too small for a "
                              f"{info.in_features}→{info.out_features} layer")
        self.register_buffer("randlora_A", A[:, :, : self.min_dim].clone(), persistent=False)  # (r, 1, d_min)
        self.register_buffer("randlora_B", B[: self.max_dim, : self.n].clone(), persistent=False)  # (d_max, n, r)
        self.randlora_lambda = nn.Parameter(torch.randn(self.r, self.n))  # (r, n)
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim)))
        if config.init_weights:
            nn.init.zeros_(self.randlora_lambda)
        self.randlora_dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` with ``ΔW = s · second @ first``: first (r·n, in), second (out, r·n)."""
        scaled_A = self.randlora_lambda[:, :, None] * self.randlora_A * self.randlora_gamma[None]  # (r, n, d_min)
        A_bar = scaled_A.flatten(0, 1)  # (r·n, d_min): rank-major
        B_bar = self.randlora_B.flatten(1)  # (d_max, n·r): basis-major
        if self.info.in_features == self.min_dim:
            return A_bar, B_bar
        return B_bar.T, A_bar.T

    def _dense_is_cheaper(self, tokens: int, fused: bool = False) -> bool:
        """Whether ΔW (out·in·r·n multiply-adds to build) beats the factored path's T·(in+out)·r·n extra work
        for ``tokens`` rows, counting the T·in·out of applying ΔW separately unless it is ``fused`` into W."""
        rn, in_f, out_f = self.r * self.n, self.info.in_features, self.info.out_features
        return out_f * in_f * rn + (0 if fused else tokens * in_f * out_f) < tokens * (in_f + out_f) * rn

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``s · x (second·first)ᵀ`` in the cheaper association for this many tokens T: through the (T, r·n)
        hidden as PEFT does (``F.linear(F.linear(x, update_B), update_A)``), or through ΔW. RandLoRA's
        r·n ≥ min(in, out) makes the hidden as wide as the layer, so for many tokens ΔW is cheaper. Same product,
        float rounding apart."""
        first, second = self.factors()
        x = self.randlora_dropout(x.to(first.dtype))
        if self._dense_is_cheaper(x.numel() // self.info.in_features):
            return F.linear(x, (second @ first) * self.scaling).to(base_out.dtype)
        return (F.linear(F.linear(x, first), second) * self.scaling).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """``x (W + s·ΔW)ᵀ + b`` in one matmul when RandLoRA is the layer's only adapter and ΔW is the cheaper
        path (no dropout, a plain ``nn.Linear`` base with a float weight of x's dtype and of the adapter's: a
        float32 adapter on a half-precision base adds its delta in float32, Delta.accumulate, as PEFT): forward and
        input gradient then cost one layer matmul each, as the frozen base alone does, plus building ΔW and its
        gradient."""
        if (type(base_layer) is not nn.Linear or not isinstance(self.randlora_dropout, nn.Identity)
                or base_layer.weight.dtype != x.dtype or not x.dtype.is_floating_point
                or self.randlora_lambda.dtype != x.dtype
                or not self._dense_is_cheaper(x.numel() // self.info.in_features, fused=True)):
            return None
        first, second = self.factors()
        weight = base_layer.weight + ((second @ first) * self.scaling).to(base_layer.weight.dtype)
        return F.linear(x, weight, base_layer.bias)

    def delta_weight(self) -> torch.Tensor:
        first, second = self.factors()
        return (second.float() @ first.float()) * self.scaling  # (out, in)


def largest_shape(model: nn.Module, config: RandLoraConfig) -> tuple[int, int]:
    """Largest (out, in) over the targeted layers, each dimension maximised separately (PEFT's ``_find_dim``)."""
    host = dict(iter_host_modules(model))
    targets = select_targets(model, config)
    infos = [i for i in (describe_layer(host[p]) for p in targets) if i is not None and i.kind == "linear"]
    if not infos:
        raise unsupported_target(targets[0], host[targets[0]], get_method(config))
    return max(i.out_features for i in infos), max(i.in_features for i in infos)


def prepare_randlora(model: nn.Module, config: RandLoraConfig) -> RandLoraConfig:
    prepared = replace(config)
    prepared._basis_shape = largest_shape(model, config)  # not a field: derived from the model, never saved
    return prepared


def build_randlora(base_layer: nn.Module, info: LayerInfo, config: RandLoraConfig, path: str = "") -> RandLoraLinear:
    shape = getattr(config, "_basis_shape", None)
    if shape is None:  # the shared bases' size comes from the whole model: only prepare_randlora knows it
        raise AdapterError("RandLoRA deltas are built through add_adapter/load_adapter (which size the shared bases "
                           "over all targeted layers), not by calling build directly.")
    out_dim, in_dim = shape
    kind = "very_sparse" if config.very_sparse else "sparse" if config.sparse else "dense"
    bases = shared_bases(config.projection_prng_key, config.r, max(out_dim, in_dim), min(out_dim, in_dim), kind)
    return RandLoraLinear(info, config, bases)


def randlora_file_fields(config: RandLoraConfig, layers: list[LayerInfo]) -> dict[str, Any]:
    return {"save_projection": False, "bias": "none",
            "fan_in_fan_out": any(i.fan_in_fan_out for i in layers)}


register_method(
    "randlora", config=RandLoraConfig, build=build_randlora, prepare=prepare_randlora, peft_type="RANDLORA",
    file_fields=randlora_file_fields, regenerated_keys=("randlora_A", "randlora_B"),
    description="Full-rank s·Σ_b B_b Λ_b A Γ_b from shared seeded random bases; only diagonal scalings λ, γ train.",
    paper="Albert et al. 2025, arXiv:2502.00987",
    variants={"randlora": {"r": 4, "randlora_alpha": 8}, "randlora_sparse": {"r": 4, "randlora_alpha": 8, "sparse": True}},
)
