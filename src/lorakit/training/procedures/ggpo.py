"""LoRA-GGPO — "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation
Optimization", Chang et al. 2025, arXiv:2502.14538 (id from memory; the reference notes list none).

During training, each LoRA linear layer's output gets a random weight perturbation whose per-row size follows
the row's weight norm and the norm of its (approximate full) gradient, with no second forward-backward (unlike
SAM):

    y = W x + s·B A x + x εᵀ,   ε_{i,:} ~ N(0, I) · (σ·‖W_i + ΔW_i‖ + β·‖∇ΔW_i‖²) / √out        (no gradient)
    ‖W_i + ΔW_i‖ ≈ √(w̄² + ‖ΔW_i‖²),   w̄ = mean row norm of the frozen W (computed once),
    ∇ΔW ≈ s·(B ∇A + ∇B A),   ΔW = s·B A   (both refreshed after each backward, before the optimizer step).

The official repository (llm172/LoRA-GGPO) was not found; this follows the implementation its authors' method
is known by, kohya-ss/sd-scripts ``networks/lora_flux.py`` (``LoRAModule.forward`` perturbation branch,
``initialize_norm_cache``, ``update_norms``, ``update_grad_norms``; defaults σ = 0.03, β = 0.01), with two
choices: ``w̄`` is the mean over *all* rows (kohya samples up to 1000 rows: the same for out ≤ 1000), and
``ΔW`` includes the scale s (kohya's ``module_weights.mul(self.scale)`` discards its result, so its ΔW is
B A unscaled; with the usual s the two differ only by s). As in kohya (``train_network.py``, which calls
``update_grad_norms`` and ``update_norms`` just before ``optimizer.step()``), both norms come from the weights the
step's gradients were taken at, and no perturbation is added until they exist (from the second step on). kohya
reads the gradients after its clipping (``max_grad_norm``); lorakit's procedures see them before the loop clips,
so ‖∇ΔW‖ is the unclipped norm (the same whenever clipping does not trigger). ε is drawn from torch's RNG, which lorakit's checkpoints save; the norms are
the procedure's checkpointed state, so resume is exact. Trainable token rows (``trainable_token_indices``) beside
the LoRA factors get no perturbation (they are no ``B A``) and train as without the procedure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ...core.config import check_non_negative
from ...core.errors import ConfigError
from ...core.model import adapter_layers
from ...methods.lora import LoraConfig, LoraLinear
from .base import Procedure, ProcedureConfig, register_procedure


@dataclass
class GgpoConfig(ProcedureConfig):
    """``ggpo_sigma`` σ: weight-norm term; ``ggpo_beta`` β: squared-gradient-norm term (kohya's names, defaults)."""

    ggpo_sigma: float = 0.03
    ggpo_beta: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "ggpo_sigma", "ggpo_beta")


class Ggpo(Procedure):
    config: GgpoConfig
    shares_batch = True  # hooks only its adapter's deltas and gradients

    def __init__(self, config: GgpoConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.deltas: dict[str, LoraLinear] = {}
        self.base_norm: dict[str, torch.Tensor] = {}  # w̄, scalar per layer
        self.weight_norm: dict[str, torch.Tensor] = {}  # ‖W_i + ΔW_i‖, (out, 1)
        self.grad_norm: dict[str, torch.Tensor] = {}  # ‖∇ΔW_i‖, (out, 1)
        self._hooks: list[Any] = []

    @classmethod
    def check_adapter_config(cls, config: GgpoConfig, adapter_config: Any, task_type: str = "causal-lm") -> None:
        """Plain LoRA (``param_groups`` refuses any other delta per layer), told from the adapter's config."""
        if type(adapter_config) is not LoraConfig or adapter_config.use_dora:
            name = "lora with use_dora" if type(adapter_config) is LoraConfig else repr(type(adapter_config).method)
            raise ConfigError(f"LoRA-GGPO needs plain LoRA on linear layers; the adapter is {name} "
                              "(use method lora without use_dora).")

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for path, layer in adapter_layers(model):
            delta = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
            if delta is None or delta.extra:  # (trainable token rows: no LoRA factor to perturb, trained plainly)
                continue
            if type(delta) is not LoraLinear:
                raise ConfigError(f"LoRA-GGPO needs plain LoRA on linear layers; {path!r} has {type(delta).__name__}.")
            self.deltas[path] = delta
            with torch.no_grad():
                self.base_norm[path] = layer.base_layer.weight.float().norm(dim=1).mean()
            self._hooks.append(delta.register_forward_hook(self._perturb(path)))
        return groups

    def _perturb(self, path: str):
        def hook(delta: LoraLinear, args, out: torch.Tensor) -> torch.Tensor | None:
            if not delta.training or path not in self.weight_norm or path not in self.grad_norm:
                return None
            x = args[0]
            with torch.no_grad():
                size = (self.config.ggpo_sigma * self.weight_norm[path] + self.config.ggpo_beta * self.grad_norm[path] ** 2)
                eps = torch.randn(delta.lora_B.weight.shape[0], delta.lora_A.weight.shape[1], dtype=x.dtype,
                                  device=x.device)  # (out, in)
                eps.mul_((size / math.sqrt(eps.shape[0])).to(x.dtype))
            return out + (x @ eps.T).to(out.dtype)

        return hook

    @torch.no_grad()
    def on_gradients(self, model: nn.Module, adapter_name: str, step: int) -> None:
        # Both norms just before the optimizer step, from the weights the gradients were taken at (kohya's
        # train_network.py calls update_grad_norms then update_norms right before optimizer.step()).
        for path, delta in self.deltas.items():
            a, b = delta.lora_A.weight, delta.lora_B.weight
            if a.grad is None or b.grad is None:
                continue
            approx = delta.scaling * (b.float() @ a.grad.float() + b.grad.float() @ a.float())  # (out, in)
            self.grad_norm[path] = approx.norm(dim=1, keepdim=True)
            dw = delta.scaling * (b.float() @ a.float())  # (out, in)
            self.weight_norm[path] = torch.sqrt(self.base_norm[path] ** 2 + (dw ** 2).sum(dim=1, keepdim=True))

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"weight_norm.{p}": t for p, t in self.weight_norm.items()},
                **{f"grad_norm.{p}": t for p, t in self.grad_norm.items()}}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            kind, path = key.split(".", 1)
            getattr(self, kind)[path] = value.clone()


register_procedure(
    "ggpo", Ggpo, config=GgpoConfig,
    description="LoRA-GGPO: random output perturbation per row sized by weight and gradient norms, no extra pass.",
    paper="Chang et al. 2025, arXiv:2502.14538",
)
