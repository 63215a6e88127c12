"""LoRA-SB — "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient Low-Rank
Fine-Tuning", Ponkshe et al., arXiv:2411.19557.

On LoRA-XS's structure ``ΔW = s · B R A`` (A, B frozen, only the r×r R trains; ``lora_xs`` in
``lorakit/methods/lora_xs.py``), start from the best rank-r approximation of the first full fine-tuning update:

    G = Σ_batches ∂(L_batch / batch_size)/∂W,   ΔW̃ = −η · sign(G)   (≈ Adam's first step, η = lr / warmup_steps),
    ΔW̃ ≈ B R A  with  ΔW̃ᵀ ≈ U Σ Vᵀ (``torch.svd_lowrank(ΔW̃ᵀ, q=r, niter=10)``),  A = Uᵀ, R = Σ / s, B = V.

Follows the official code, ``CERT-Lab/lora-sb``: ``utils/gradient_utils.py`` ``estimate_and_process_grads_torch``
(loss divided by the batch's sample count, gradients summed, ``-lr * sign``), ``train_arithmetic.py``
(``eff_lr = lr / (warmup_ratio * total_steps)``, i.e. lr over the warmup steps), ``utils/svd_utils.py``
``get_svd_grad`` (``manual_seed(42)``, a discarded ``randn(out, r)``, then ``svd_lowrank(q=r, niter=10)``) and
``utils/initialization_utils.py`` ``find_and_initialize_grad`` (``lora_A = Uᵀ``, latent ``= diag(S)``,
``lora_B = V``). Choices: the official code forces α = r (s = 1); here R absorbs 1/s so any α gives the same
ΔW̃. The official code casts U, S, V to bf16; here they keep the adapter's dtype. The seeded draw runs in a
forked RNG, so the caller's random state is untouched. The base is not changed: the model at step 0 already
holds ≈ the first full-FT step (as in the paper). Select with ``--method lora_xs --init lora_sb``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import AdapterError, ConfigError
from ..core.inits import BaseEdit, register_init
from ..core.model import adapter_layers
from ..methods.nlora import MiddleConfig, MiddleLinear
from ._common import Target, base_targets, check_factorisable, check_rank, config_is, target_gradients


def middle_targets(model: nn.Module, adapter_name: str, init: str) -> list[Target]:
    """The adapter's ``B M A`` deltas (LoRA-XS, SLoRA, NLoRA, IntTune); AdapterError for any other delta."""
    out = []
    for path, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        delta = layer.adapters[adapter_name]
        if not isinstance(delta, MiddleLinear):
            raise AdapterError(f"init {init!r} needs a B·M·A adapter (lora_xs, slora, nlora, inttune); "
                               f"{type(delta).__name__} at {path!r} is not one.")
        out.append(Target(path, layer, delta))
    if not out:
        raise AdapterError(f"init {init!r}: adapter {adapter_name!r} has no layers to initialise.")
    return out


# ``Init.fits`` of the inits that set a B·M·A adapter's three factors (middle_targets needs them)
middle_style = config_is(MiddleConfig, "B·M·A adapters")


def lora_sb_factors(update: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), R (r, r), B (out, r))`` with ``s·B R A`` the rank-r approximation of ``update`` (out, in)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        torch.randn(update.shape[0], r)  # get_svd_grad draws (and drops) this before the SVD
        U, S, V = torch.svd_lowrank(update.T, q=r, niter=10)  # U (in, r), S (r,), V (out, r)
    return U.T, torch.diag(S) / scaling, V


def _check_options(lr: float, warmup_steps: int) -> None:
    if lr <= 0 or warmup_steps < 1:
        raise ConfigError(f"lora_sb: lr must be > 0 and warmup_steps >= 1 (got lr={lr}, warmup_steps={warmup_steps}).")


def estimate_lora_sb(model: nn.Module, targets: Sequence[tuple[str, nn.Module, Any]],
                     batches: Sequence[Mapping[str, Any]] | None, spec: str, *, lr: float = 1e-4,
                     warmup_steps: int = 1, num_batches: int | None = None) -> dict[str, torch.Tensor]:
    """The gradient pass alone, before ``add_adapter`` builds the adapter (``Init.estimate``): ``{path: G}``."""
    _check_options(lr, warmup_steps)
    return target_gradients(model, base_targets(targets), batches, spec, num_batches, per_sample=True)


def run_lora_sb(model: nn.Module, adapter_name: str, batches: Sequence[Mapping[str, Any]] | None, spec: str, *,
                lr: float = 1e-4, warmup_steps: int = 1, num_batches: int | None = None,
                estimate: dict[str, torch.Tensor] | None = None) -> dict[str, BaseEdit]:
    """Set A, R, B of every ``B R A`` delta from ``−(lr / warmup_steps) · sign(G)``; the base is not changed.

    ``estimate``: the gradients :func:`estimate_lora_sb` computed before the adapter existed (None: run the
    pass now). Raises ConfigError for lr <= 0 or warmup_steps < 1, AdapterError for missing data or a module
    whose gradient is NaN or whose update has rank < r (the model is then unchanged)."""
    _check_options(lr, warmup_steps)
    targets = middle_targets(model, adapter_name, spec)
    grads = target_gradients(model, targets, batches, spec, num_batches, per_sample=True, estimate=estimate,
                             adapter_name=adapter_name)
    eta = lr / warmup_steps
    planned = []
    for t in targets:
        grad = grads.pop(t.path)
        check_factorisable(t.path, grad, spec, "gradient")
        update = -eta * torch.sign(grad)  # (out, in)
        A, R, B = lora_sb_factors(update, t.delta.r, t.delta.scaling)
        check_rank(t.path, torch.diagonal(R).abs(), t.delta.r, spec, "approximate first update")
        planned.append((t.delta, A, R, B))
    for delta, A, R, B in planned:
        delta.lora_A.weight.copy_(A)
        delta.middle.weight.copy_(R)
        delta.lora_B.weight.copy_(B)
    return {}


register_init(
    "lora_sb", run=run_lora_sb, estimate=estimate_lora_sb, needs_data=True, fits=middle_style,
    description="LoRA-XS's B R A set to the rank-r SVD of the approximate first full-FT step −η·sign(G) "
                "(use with --method lora_xs).",
    paper="Ponkshe et al. 2024, arXiv:2411.19557",
)
