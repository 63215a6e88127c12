"""LoRA-GA — "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", Wang, Yu & Li, arXiv:2407.05000.

Make the first LoRA step point along the full fine-tuning gradient. With ``G = mean_batches ∂L/∂W`` (out, in)
and ``G ≈ U S Vᵀ`` (``torch.svd_lowrank(G, q=min(4r, min(out, in)), niter=4)``), the default split ``ArB2r``
takes ``A = V[:, :r]ᵀ`` (r, in) and ``B = U[:, r:2r]`` (out, r); the base is offset so the step-0 output is
unchanged: ``W ← W − s·B A`` (``s = α/r``). Splits: ``ArB2r`` (default), ``A2rBr`` (A from r..2r, B from 0..r),
``ArBr`` (A odd, B even indices), ``random``.

Two scalings, chosen by the spec:

- ``"lora_ga"`` — PEFT's port (``peft/tuners/lora/layer.py`` ``lora_ga_init``): ``B`` also carries the
  singular values ``diag(S_B)``; ``scale="stable"`` multiplies B only by ``out^{1/4}/√γ`` (γ = ``stable_gamma``
  = 16); ``"weight_svd"`` scales B by ``σ_1(W)/S_B[0]``; ``"gd_scale"`` divides A and B by ``s``; ``"unit"``.
  A and B are cast to the adapter dtype before the offset is computed, as PEFT. The file stays a PEFT LoRA
  with ``init_lora_weights="lora_ga"``.
- ``"lora_ga_official"`` — the official repo (``Outsider565/LoRA-GA`` ``peft/src/peft/tuners/lora/layer.py``
  ``lora_ga_init``): A and B are plain singular vectors; ``scale="stable"`` (default) multiplies both by
  ``out^{1/4}/√γ`` (the paper's stable scale, §3.3); ``"gd"`` divides both by ``s``; ``"weightS"`` multiplies
  both by ``mean(√(σ_{1..r}(W)/s))`` (``svd_lowrank(W, q=4r, niter=4)``); ``"unit"``; ``norm_clip=True`` shrinks
  the offset to the largest |W| entry. ``direction="random"`` samples with Python's ``random`` as the repo does.

Gradients come from :func:`lorakit.init._common.weight_gradients` (per-module hooks that accumulate and drop
each ``.grad``; the loss of each batch is averaged over batches, as both the official ``estimate_gradient``
and PEFT's ``estimate_gradients``). The base model (adapters off) runs in train mode. Needs batches with labels.
``add_adapter(..., init="lora_ga", init_batches=...)`` runs that pass (:func:`estimate_lora_ga`) before it builds
the adapter, as PEFT runs ``preprocess_loraga`` before ``get_peft_model``, so the pass does not hold the adapter.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.inits import BaseEdit, register_init
from ._common import (base_targets, check_factorisable, check_rank, linear_targets, lora_style, move_into_adapter,
                      target_gradients)

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = {"lora_ga": ("stable", "weight_svd", "gd_scale", "unit"),
          "lora_ga_official": ("stable", "gd", "weightS", "unit")}


def split_indices(direction: str, r: int, official: bool) -> tuple[Any, Any]:
    """Which singular triplets (of the top 2r) go to A and to B."""
    if direction == "ArB2r":
        return slice(0, r), slice(r, 2 * r)
    if direction == "A2rBr":
        return slice(r, 2 * r), slice(0, r)
    if direction == "ArBr":
        return slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    if official:  # random.sample over 2r indices: first r to A, the rest to B
        order = random.sample(range(2 * r), 2 * r)
        return order[:r], order[r:]
    chosen = torch.randperm(2 * r)[:r]  # PEFT: the same r indices for A and B
    return chosen, chosen


def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, *, official: bool,
                    direction: str, scale: str, stable_gamma: float, path: str = "",
                    init: str = "lora_ga") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` float32 from the gradient ``grad`` (out, in) of a base weight ``weight`` (out, in)."""
    check_factorisable(path, grad, init, "gradient")
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)  # U (out, q), S (q,), V (in, q)
    check_rank(path, S, 2 * r, init, "gradient")
    Vh = V.T  # (q, in)
    ia, ib = split_indices(direction, r, official)
    A, B = Vh[ia], U[:, ib]  # (r, in), (out, r)
    out_features = grad.shape[0]
    stable = out_features ** 0.25 / stable_gamma ** 0.5
    if official:
        if scale == "stable":
            A, B = A * stable, B * stable
        elif scale == "gd":
            A, B = A / scaling, B / scaling
        elif scale == "weightS":
            _, Sw, _ = torch.svd_lowrank(weight, q=4 * r, niter=4)
            avg = torch.sqrt(Sw[:r] / scaling).mean()
            A, B = A * avg, B * avg
        return A, B
    S_B = S[ib]
    B = B @ torch.diag(S_B)
    if scale == "stable":
        B = B * stable
    elif scale == "weight_svd":
        _, Sw, _ = torch.svd_lowrank(weight, q=r, niter=4)
        if S_B[0] > 0:
            B = B * (Sw[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B


def _check_options(spec: str, direction: str, scale: str, norm_clip: bool, stable_gamma: float) -> None:
    official = spec == "lora_ga_official"
    if direction not in DIRECTIONS:
        raise ConfigError(f"{spec}: direction={direction!r} is not one of {DIRECTIONS}.")
    if scale not in SCALES[spec]:
        raise ConfigError(f"{spec}: scale={scale!r} is not one of {SCALES[spec]}"
                          + (" (the official names)" if official else " (PEFT's names)") + ".")
    if not stable_gamma > 0:  # the stable scale out^{1/4} / √γ
        raise ConfigError(f"{spec}: stable_gamma must be > 0, got {stable_gamma}.")
    if norm_clip and not official:
        raise ConfigError("norm_clip is an option of lora_ga_official only (PEFT's port has none).")


def estimate_lora_ga(model: nn.Module, targets: Sequence[tuple[str, nn.Module, Any]],
                     batches: Sequence[Mapping[str, Any]] | None, spec: str, *, direction: str = "ArB2r",
                     scale: str = "stable", stable_gamma: float = 16, num_batches: int | None = None,
                     norm_clip: bool = False) -> dict[str, torch.Tensor]:
    """The gradient pass alone, on the base model before the adapter is built (``Init.estimate``, used by
    ``add_adapter`` with batches): ``{path: mean ∂L/∂W (out, in) float32}`` over the linear targets. Options
    are checked here first, so a bad one fails before the pass; errors as :func:`run_lora_ga`."""
    _check_options(spec, direction, scale, norm_clip, stable_gamma)
    return target_gradients(model, base_targets(targets), batches, spec, num_batches)


def run_lora_ga(model: nn.Module, adapter_name: str, batches: Sequence[Mapping[str, Any]] | None, spec: str, *,
                direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16,
                num_batches: int | None = None, norm_clip: bool = False,
                estimate: dict[str, torch.Tensor] | None = None) -> dict[str, BaseEdit]:
    """Gradient-SVD init of every LoRA linear of ``adapter_name``; returns the base offsets ``−s·B A``.

    ``num_batches``: use exactly that many batches (AdapterError when fewer come); default all given.
    ``estimate``: the gradients :func:`estimate_lora_ga` computed before the adapter was attached (consumed:
    each module's gradient is freed once its factors are computed); None = run the gradient pass now.
    Raises ConfigError for an unknown direction/scale, AdapterError for missing data, a module without a
    gradient, or one whose gradient is NaN or of rank < 2r (the model is then unchanged)."""
    official = spec == "lora_ga_official"
    _check_options(spec, direction, scale, norm_clip, stable_gamma)
    targets = linear_targets(model, adapter_name, spec)
    grads = target_gradients(model, targets, batches, spec, num_batches, estimate=estimate, adapter_name=adapter_name)
    planned = []
    for t in targets:  # everything computed before anything is written
        units = t.delta.units()
        r, s = units.A.shape[0], units.scaling
        weight = t.weight()
        A, B = lora_ga_factors(grads.pop(t.path), weight, r, s, official=official, direction=direction,
                               scale=scale, stable_gamma=stable_gamma, path=t.path, init=spec)
        A, B = A.to(units.A.dtype), B.to(units.B.dtype)  # the offset matches what the adapter computes
        if norm_clip:
            ratio = weight.abs().max() / (s * (B.float() @ A.float())).abs().max()
            if ratio < 1:
                A, B = A * ratio ** 0.5, B * ratio ** 0.5
        planned.append((t, units, A, B, s))
    edits = {}
    for t, units, A, B, s in planned:
        edits[t.path] = move_into_adapter(t.layer, units, A, B)  # W_now = W − s·B A, in place
    return edits


register_init(
    "lora_ga", run=run_lora_ga, estimate=estimate_lora_ga, pattern=r"lora_ga(_official)?", needs_data=True,
    changes_base=True, fits=lora_style,
    description="A, B from the SVD of the full-weight gradient over a few batches (ArB2r), base offset by −s·BA; "
                "lora_ga = PEFT's scaling, lora_ga_official = the official repo's.",
    paper="Wang et al. 2024, arXiv:2407.05000",
)
