"""Inits that move a rank-r part of the base weight into the adapter: ``W = W_res + s · B A``.

- PiSSA: "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
  Meng, Wang & Zhang, arXiv:2404.02948. ``W = U S Vᵀ`` (W as (out, in)); with the top r triplets,
  ``B = U_r √(S_r / s)``, ``A = √(S_r / s) V_rᵀ`` and ``W_res = W − s·B A``, so the adapter starts as the
  principal part and the frozen base holds the rest. ``"pissa_niter_K"`` uses the randomised
  ``torch.svd_lowrank(W, r, niter=K)`` instead of the full SVD (faster, not deterministic across seeds).
- OLoRA: "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", Büyükakyüz, arXiv:2406.01775.
  ``W = Q R`` (reduced QR of W as (out, in)); ``B = Q[:, :r]``, ``A = R[:r]``, ``W_res = W − s·B A``.

Both follow PEFT's ``LoraLayer.pissa_init`` / ``olora_init`` (peft/tuners/lora/layer.py): same factors, the
scaling ``s`` divided out of the singular values (PiSSA) or left on the residual (OLoRA), float32 arithmetic
with the residual cast back to the base dtype. Choice: OLoRA factors the weight as (out, in) on every layer
kind; PEFT factors ``weight`` as stored, which for GPT-2's Conv1D (stored (in, out)) gives mis-shaped factors.
Only linear deltas exposing rank-one units (LoRA, rsLoRA, DoRA) are initialised; embedding layers keep LoRA's
default init, as in PEFT. A DoRA magnitude needs no update: ``‖W_res + s·B A‖ = ‖W‖``, its value at build time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..core.delta import oriented_weight
from ..core.errors import AdapterError
from ..core.inits import BaseEdit, register_init
from ._common import (adapter_record, check_factorisable, check_rank_fits, lora_style, method_layers,
                      move_into_adapter, writable_units)

# (weight (out, in) float32, r, scaling) -> (A (r, in), B (out, r))
Factorise = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


def split_base_weight(model: nn.Module, adapter_name: str, factorise: Factorise, init: str) -> dict[str, BaseEdit]:
    """Set every linear delta of ``adapter_name`` to ``factorise(W)`` and subtract ``s·B A`` from its base.

    Returns the base edits by module path (``W_now = W_orig − s·B A``). Raises AdapterError for a delta
    without rank-one units (another method), a base weight that is not floating point (quantised) or that has
    NaN/inf entries, all checked before any module is written (the model is then unchanged).
    The records are taken after the last module (:func:`adapter_record`), so that the records of the modules
    done never add to a later SVD's peak memory; an adapter in another dtype than float32 cannot hold the
    float32 factors exactly, and then keeps them as it goes."""
    targets = []
    for path, layer, delta in method_layers(model, adapter_name):
        if layer.info.kind != "linear":
            continue
        units = writable_units(delta, path, init)
        weight = oriented_weight(layer.base_layer, layer.info)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise AdapterError(f"{path!r}: base weight of dtype {weight.dtype} cannot be split; initialise on a "
                               "float32/float16/bfloat16 base, then quantise the residual.")
        check_factorisable(path, weight, init, "base weight")
        check_rank_fits(path, units.A.shape[0], weight.shape, init)
        targets.append((path, layer, units, weight))
    kept: dict[str, BaseEdit] = {}
    for path, layer, units, weight in targets:
        r = units.A.shape[0]
        A, B = factorise(weight.float(), r, units.scaling)  # fresh tensors: they become the record
        exact = A.dtype == units.A.dtype and B.dtype == units.B.dtype
        edit = move_into_adapter(layer, units, A, B, record=not exact)  # W_res = W + s·(−B) A, in place
        if edit is not None:
            kept[path] = edit
    return {path: kept[path] if path in kept else adapter_record(units) for path, _, units, _ in targets}


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's principal factors of ``weight`` (out, in): ``B = U_r √(S_r/s)`` (out, r), ``A = √(S_r/s) V_rᵀ`` (r, in)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)  # V (in, r)
        Vh = V.T
    root = torch.sqrt(S / scaling)  # (r,)
    return root[:, None] * Vh, U * root[None, :]


def run_pissa(model: nn.Module, adapter_name: str, batches: Any, spec: str) -> dict[str, BaseEdit]:
    niter = int(spec.split("_niter_")[1]) if "_niter_" in spec else None
    return split_base_weight(model, adapter_name, lambda w, r, s: pissa_factors(w, r, s, niter), spec)


def olora_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's factors of ``weight`` (out, in): ``B = Q[:, :r]`` (out, r), ``A = R[:r]`` (r, in) from ``W = Q R``."""
    Q, R = torch.linalg.qr(weight)  # reduced: Q (out, k), R (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def run_olora(model: nn.Module, adapter_name: str, batches: Any, spec: str) -> dict[str, BaseEdit]:
    return split_base_weight(model, adapter_name, olora_factors, spec)


register_init(
    "pissa", run=run_pissa, pattern=r"pissa(_niter_[0-9]+)?", changes_base=True, rerun_on_load=True,
    random_pattern=r"pissa_niter_[0-9]+", fits=lora_style, spelling="pissa_niter_K (K >= 0 digits, e.g. pissa_niter_4)",
    description="Adapter = the top-r singular part of W, base = the residual (pissa_niter_K: randomised SVD).",
    paper="Meng et al. 2024, arXiv:2404.02948",
)
register_init(
    "olora", run=run_olora, changes_base=True, rerun_on_load=True, fits=lora_style,
    description="Adapter = the first r columns of W's QR factorisation (B = Q_r, A = R_r), base = the residual.",
    paper="Büyükakyüz 2024, arXiv:2406.01775",
)
