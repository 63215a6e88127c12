"""CorDA — "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware
Parameter-Efficient Fine-tuning", Yang et al., arXiv:2406.05223.

Decompose each weight in the context of its inputs: with ``C = mean_batches Xᵀ X`` (in × in) over a few
batches of layer inputs ``X``, damped ``C' = C + λ·mean(diag C)·I`` (λ = 0.01, doubled until
``‖C' C'^{-1} − I‖ < 0.05``):

    W C' = U S Vhᵀ,   V = (Vh C'^{-1})ᵀ,   keep r triplets (``ipm``: largest — instruction-previewed;
    ``kpm``: smallest — knowledge-preserved),   A = √(S/s) Vᵀ,  B = U √(S/s),   W ← W − s·B A,

so ``W = W_res + s·B A`` and the step-0 output is unchanged.

Follows PEFT (``peft/tuners/lora/corda.py`` ``preprocess_corda`` / ``calib_cov_distribution`` /
``collect_eigens_for_layer`` / ``crop_corda_eigens`` and layer.py ``corda_init``): each forward's input is
scaled by ``1 / |max(X)|`` before ``Xᵀ X``, covariances are averaged over forwards, the base runs in eval mode.
Choice: PEFT's hook expects batch size 1 (it squeezes the batch dim); here a (b, t, in) input is flattened to
(b·t, in), which is the same for b = 1. Like PEFT, padding tokens are not masked. Option ``corda_method``
(PEFT's ``CordaConfig`` field). The changed base is recorded, so ``save_adapter(..., original_base=True)``
writes the rank-2r LoRA for the original weights, as PEFT's conversion.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import AdapterError, ConfigError
from ..core.inits import BaseEdit, register_init
from ..core.model import disable_adapters
from ._common import (Target, _device, _to, check_batches, check_factorisable, check_rank_fits, linear_targets,
                      lora_style, move_into_adapter)

MAX_DAMP_DOUBLINGS = 40


def input_covariances(model: nn.Module, targets: list[Target], batches: list[Mapping[str, Any]],
                      init: str = "corda") -> dict[str, torch.Tensor]:
    """``mean_forwards (X/|max X|)ᵀ (X/|max X|)`` (in, in) float32 of each target's input, base model in eval mode."""
    cov: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    handles = []

    def hook_for(path: str):
        def hook(module, args, output):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise AdapterError(f"init {init!r}: the inputs of module {path!r} have NaN/inf entries (or are all "
                                   "zero); CorDA cannot build their covariance (model left unchanged).")
            cov[path] = cov[path] + x.T @ x if path in cov else x.T @ x
            count[path] = count.get(path, 0) + 1
        return hook

    was_training = model.training
    device = _device(model)
    try:
        for t in targets:
            handles.append(t.layer.base_layer.register_forward_hook(hook_for(t.path)))
        model.eval()
        with disable_adapters(model):
            for batch in batches:
                model(**_to(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [t.path for t in targets if t.path not in cov]
    if missing:
        raise AdapterError(f"init {init!r}: module(s) {missing[:5]} saw no input in the batches given.")
    return {p: c / count[p] for p, c in cov.items()}


def corda_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, scaling: float, method: str,
                  path: str = "", init: str = "corda") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` float32 from ``weight`` (out, in) and its input covariance ``cov`` (in, in)."""
    check_factorisable(path, cov, init, "input covariance")
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    for _ in range(MAX_DAMP_DOUBLINGS):
        fixed = cov + eye * torch.mean(torch.diag(cov)) * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise AdapterError(f"init {init!r}: the input covariance of module {path!r} stays singular after damping "
                           f"by 2^{MAX_DAMP_DOUBLINGS}·0.01·mean(diag); check its inputs (model left unchanged).")
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    V = (Vh @ inv).T  # (in, k)
    keep = slice(0, r) if method == "ipm" else slice(-r, None)
    U, S, V = U[:, keep], S[keep] / scaling, V[:, keep]
    for name, m in (("U", U), ("S", S), ("V", V)):
        check_factorisable(path, m, init, f"decomposition factor {name}")
    return V.T * S.sqrt()[:, None], U * S.sqrt()[None, :]


def run_corda(model: nn.Module, adapter_name: str, batches: Sequence[Mapping[str, Any]] | None, spec: str, *,
              corda_method: str = "ipm", num_batches: int | None = None) -> dict[str, BaseEdit]:
    """CorDA on every LoRA linear of ``adapter_name``; returns the base edits ``−s·B A``.

    Raises ConfigError for an unknown ``corda_method``, AdapterError for missing data or a module whose inputs
    or decomposition have NaN/inf (model then unchanged)."""
    if corda_method not in ("ipm", "kpm"):
        raise ConfigError(f"corda: corda_method must be 'ipm' or 'kpm', got {corda_method!r}.")
    batches = check_batches(batches, spec, num_batches)[:num_batches]
    targets = linear_targets(model, adapter_name, spec)
    for t in targets:  # before the data pass
        check_rank_fits(t.path, t.delta.units().A.shape[0], (t.info.out_features, t.info.in_features), spec)
    covs = input_covariances(model, targets, batches, spec)
    planned = []
    for t in targets:
        units = t.delta.units()
        r, s = units.A.shape[0], units.scaling
        A, B = corda_factors(t.weight(), covs.pop(t.path), r, s, corda_method, t.path, spec)
        planned.append((t, units, A, B, s))
    edits = {}
    for t, units, A, B, s in planned:
        edits[t.path] = move_into_adapter(t.layer, units, A, B)
    return edits


register_init(
    "corda", run=run_corda, needs_data=True, changes_base=True, fits=lora_style,
    description="Adapter = r components of the SVD of W·C (C = input covariance from a few batches; ipm: largest, "
                "kpm: smallest), base = the residual.",
    paper="Yang et al. 2024, arXiv:2406.05223",
)
