"""ALLoRA — "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", Huang & Balestriero, arXiv:2410.09692.

LoRA without dropout and without the scaling factor, ``f(x) = W x + B A x``, where the gradient reaching the
adapter's parameters through output row ``i`` is scaled inversely to that row's norm:

    g̃_i = g_i / √(‖(BA)_{i,:}‖₂ + 1/η²)          (g_i = ∂L/∂(BAx)_i, per token)

so a row starts at rate η (B = 0) and slows as it grows. Only the gradients of A and B change; the gradient
that flows on to the layer's input (and lower layers) is the unscaled one. No official code was found; this
follows the paper's equation (§3, the ALLoRA update; defaults l_b = 1e-4 as the run's lr, η² ∈ {1, 2, 4},
η = 1 in its Table 1). The ALLoRA-OD and ASF-LoRA variants are not implemented.

How: a forward hook on each LoRA linear delta recomputes its output as ``y_p + (y_x − stop_grad(y_x))``, with
``y_p = B A stop_grad(x)`` carrying the row-scaled gradient to A and B and ``y_x = stop_grad(B) stop_grad(A) x``
the unscaled one to ``x``; the value is the delta's own. ``c_i`` is computed from the weights at forward time.
Composes with plain LoRA on linear layers (``lora_alpha == r`` so that s = 1, ``lora_dropout = 0``, no
``lora_bias``, no DoRA); any other delta is a ConfigError at optimizer construction. Trainable token rows
(``trainable_token_indices``) beside the LoRA factors train unscaled: the paper's rule is about ``BA``'s rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_positive
from ...core.errors import ConfigError
from ...core.model import adapter_layers
from ...methods.lora import LoraConfig, LoraLinear
from .base import Procedure, ProcedureConfig, register_procedure


@dataclass
class AlloraConfig(ProcedureConfig):
    """``eta``: η, the rate multiplier of a zero-norm row (the paper tries η² ∈ {1, 2, 4}; default 1)."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "eta")


def _check(path: str, delta: nn.Module) -> None:
    if type(delta) is not LoraLinear:
        raise ConfigError(f"ALLoRA needs plain LoRA on linear layers; {path!r} has {type(delta).__name__} "
                          "(use LoraConfig without use_dora and leave embeddings untargeted).")
    problems = []
    if delta.scaling != 1.0:
        problems.append(f"scaling {delta.scaling:g} (set lora_alpha = r, no rsLoRA)")
    if not isinstance(delta.lora_dropout, nn.Identity):
        problems.append("dropout (set lora_dropout = 0)")
    if delta.lora_B.bias is not None:
        problems.append("lora_bias (set lora_bias = False)")
    if problems:
        raise ConfigError(f"ALLoRA uses no scaling factor and no dropout; the adapter at {path!r} has "
                          f"{', '.join(problems)}.")


class Allora(Procedure):
    config: AlloraConfig
    shares_batch = True  # hooks only its adapter's deltas

    @classmethod
    def check_adapter_config(cls, config: AlloraConfig, adapter_config: Any, task_type: str = "causal-lm") -> None:
        """What ``_check`` refuses per layer, from the adapter's config: plain LoRA (not DoRA, not another
        method), scaling 1, no dropout, no lora_bias."""
        if type(adapter_config) is not LoraConfig or adapter_config.use_dora:
            name = "lora with use_dora" if type(adapter_config) is LoraConfig else repr(type(adapter_config).method)
            raise ConfigError(f"ALLoRA needs plain LoRA on linear layers; the adapter is {name} "
                              "(use method lora without use_dora).")
        problems = []
        if adapter_config.scaling != 1.0:
            problems.append(f"scaling {adapter_config.scaling:g} (set lora_alpha = r, no rsLoRA)")
        if adapter_config.lora_dropout > 0:
            problems.append("dropout (set lora_dropout = 0)")
        if adapter_config.lora_bias:
            problems.append("lora_bias (set lora_bias = False)")
        if problems:
            raise ConfigError(f"ALLoRA uses no scaling factor and no dropout; the adapter has {', '.join(problems)}.")

    def __init__(self, config: AlloraConfig, train_config) -> None:
        super().__init__(config, train_config)
        self._hooks: list[Any] = []

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # (trainable token rows, ``Delta.extra``, are no LoRA factor: they train at the plain rate, as in LoRA+)
        deltas = [(path, layer.adapters[adapter_name]) for path, layer in adapter_layers(model)
                  if adapter_name in layer.adapters and not layer.adapters[adapter_name].extra]
        for path, delta in deltas:
            _check(path, delta)
        offset = 1.0 / self.config.eta ** 2
        for _, delta in deltas:
            self._hooks.append(delta.register_forward_hook(lambda d, args, out: _row_scaled(d, args[0], out, offset)))
        return groups

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _row_scaled(delta: LoraLinear, x: torch.Tensor, out: torch.Tensor, offset: float) -> torch.Tensor | None:
    if not torch.is_grad_enabled():
        return None
    a, b = delta.lora_A.weight, delta.lora_B.weight  # (r, in), (out, r)
    x = x.to(a.dtype)
    with torch.no_grad():
        c = ((b @ a).norm(dim=1) + offset).rsqrt()  # (out,): 1 / √(‖(BA)_i‖ + 1/η²)
    y_params = F.linear(F.linear(x.detach(), a), b)  # (..., out)
    if y_params.requires_grad:
        y_params.register_hook(lambda g: g * c)
    y_input = F.linear(F.linear(x, a.detach()), b.detach())
    return (y_params + (y_input - y_input.detach())).to(out.dtype)


register_procedure(
    "allora", Allora, config=AlloraConfig,
    description="ALLoRA: LoRA without dropout or scaling; adapter gradients of output row i scaled by "
                "1/sqrt(||(BA)_i|| + 1/eta^2).",
    paper="Huang & Balestriero 2024, arXiv:2410.09692",
)
