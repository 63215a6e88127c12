"""SoRA — "Sparse Low-rank Adaptation of Pre-trained Language Models", Ding et al., EMNLP 2023,
arXiv:2311.11696.

A LoRA of maximum rank ``r`` with a trainable gate per rank:

    y = W x + s · B (g ⊙ A dropout(x)),   g ∈ R^{1×r},  s = α / r

The gate is trained in its own optimizer group (own lr ``sparse_lr``, no weight decay) and after every Adam
step passed through the proximal (soft-threshold) map of an L1 penalty with threshold ξ; an L1 term
``η · Σ|g| / #gates`` is also added to the loss. Ranks whose gate is exactly 0 contribute nothing, and at the
end they are cut out: ``to_lora`` writes a plain PEFT LoRA with per-module ranks (``rank_pattern``) holding
only the live ranks, with g folded into B — exactly the same ΔW.

Follows the official code, ``TsinghuaC3I/SoRA``:

- ``src/lora.py`` ``LowRankLinear``: A Kaiming-uniform(a=√5), B = 0, ``gate = randn(1, r)``; forward
  ``((dropout(x) @ A.T) * gate) @ B.T * scaling``.
- ``src/sparse_optimizer.py`` ``SparseAdamW.step``: AdamW update, then with ξ = ``sparse_lambda`` (our
  ``sparse_lambda_2``, the name of its command-line flag) the three in-place masked ops
  ``p[p > ξ] -= ξ; p[p < -ξ] += ξ; p[|p| < ξ] = 0``, in that order. We replicate them exactly, quirk included:
  an entry in (ξ, 2ξ) is shrunk by the first op and then zeroed by the third, so the effective rule is
  "zero if |g| < 2ξ, else shrink by ξ" (not the textbook prox). ξ is not multiplied by the learning rate
  (the official ``sparse_optimizer_multiply_lr.py`` variant does that; not used here).
- ``_build_lambda_list``: the sparsifying schedule, ξ stepping through ``lambda_num`` values from
  ``sparse_lambda_2`` to ``max_lambda`` (``linear``, ``log_linear``, ``exp_linear``). The official trainer
  advances one value per training stage (a fixed number of epochs); here stage k of ``lambda_num`` covers the
  k-th equal share of the run's steps, so ξ is a function of the step and resuming is exact.
- ``src/trainer.py`` ``compute_loss``: ``loss += sparse_lambda * Σ|gate| / numel(gates)`` (our ``sparse_lambda``).

The prox runs in ``on_step``, right after the optimizer step, which is where ``SparseAdamW`` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import (AdapterConfig, check_non_negative, check_positive, check_positive_ints,
                           field_error)
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.model import adapter_layers, adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora

SCHEDULES = ("linear", "log_linear", "exp_linear")


@dataclass
class SoraConfig(AdapterConfig):
    """SoRA fields.

    - ``r``: maximum rank (one gate per rank). ``lora_alpha``: scaling numerator (alpha / r).
    - ``lora_dropout``: dropout on the adapter's input during training, in [0, 1).
    - ``sparse_lambda`` (η): weight of the L1 loss η·Σ|g|/#gates.
    - ``sparse_lambda_2`` (ξ): the proximal threshold applied to the gates after every step.
    - ``lambda_schedule`` / ``max_lambda`` / ``lambda_num``: ξ from sparse_lambda_2 to max_lambda in lambda_num stages.
    - ``sparse_lr``: the gates' learning rate (None = the run's lr).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    sparse_lambda: float = 1e-3
    sparse_lambda_2: float = 1e-3
    lambda_schedule: Literal["linear", "log_linear", "exp_linear"] | None = None
    max_lambda: float | None = None
    lambda_num: int = 1
    sparse_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        check_non_negative(self, "sparse_lambda", "sparse_lambda_2", "max_lambda", finite=True)
        if self.lambda_schedule is not None:
            if self.max_lambda is None:
                raise field_error(self, "max_lambda", f" must be set: lambda_schedule={self.lambda_schedule!r} "
                                                      "ramps the sparsity weight up to it.")
            check_positive_ints(self, "lambda_num")
        if self.lambda_schedule == "exp_linear":
            check_positive(self, "sparse_lambda_2", "max_lambda",
                           note=" (the exp_linear schedule interpolates log ξ)")
        check_positive(self, "sparse_lr", finite=True)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def threshold(self, step: int, total_steps: int) -> float:
        """ξ for the update after ``step`` completed steps (SparseAdamW._build_lambda_list values, one per stage)."""
        if self.lambda_schedule is None or self.lambda_num == 1:
            return self.sparse_lambda_2
        lo, hi, n = self.sparse_lambda_2, self.max_lambda, self.lambda_num
        stage = min(n - 1, (step - 1) * n // max(total_steps, 1))
        t = stage / (n - 1)
        if self.lambda_schedule == "linear":
            return lo + t * (hi - lo)
        if self.lambda_schedule == "log_linear":  # np.log(np.linspace(exp(lo), exp(hi), n))
            return math.log(math.exp(lo) + t * (math.exp(hi) - math.exp(lo)))
        return math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))  # exp_linear


class SoraLinear(Delta):
    """``Δ(x) = s · B (g ⊙ A dropout(x))`` with one gate per rank."""

    def __init__(self, info: LayerInfo, config: SoraConfig):
        super().__init__(info)
        self.r = config.r
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(info.in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, info.out_features, bias=False)
        self.gate = nn.Parameter(torch.randn(1, config.r))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (self.lora_B(self.lora_A(x) * self.gate) * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() * self.gate.float()) @ self.lora_A.weight.float() * self.scaling

    def units(self) -> RankUnits:
        return RankUnits(A=self.gate.T * self.lora_A.weight, B=self.lora_B.weight, scaling=self.scaling)

    def live_ranks(self) -> torch.Tensor:
        """Indices of the ranks whose gate is not exactly zero."""
        return torch.nonzero(self.gate.detach()[0] != 0).flatten()

    @torch.no_grad()
    def proximal_step(self, xi: float) -> None:
        """sparse_optimizer.py SparseAdamW.step, the three masked in-place ops in their order."""
        g = self.gate.data
        g[g > xi] -= xi
        g[g < -xi] += xi
        g[g.abs() < xi] = 0.0


def build_sora(base_layer: nn.Module, info: LayerInfo, config: SoraConfig, path: str = "") -> SoraLinear:
    return SoraLinear(info, config)


def _deltas(model: nn.Module, name: str) -> list[tuple[str, SoraLinear]]:
    return [(path, layer.adapters[name]) for path, layer in adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], SoraLinear)]


def sora_param_groups(model: nn.Module, name: str, lr: float) -> list[dict]:
    """The gates in their own group (``sparse_lr``, no weight decay), everything else trainable in the main one."""
    config = adapter_state(model).configs[name]
    gates = [d.gate for _, d in _deltas(model, name) if d.gate.requires_grad]
    gate_ids = {id(g) for g in gates}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    return [{"params": rest}, {"params": gates, "lr": config.sparse_lr or lr, "weight_decay": 0.0}]


def sora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """trainer.py compute_loss: ``sparse_lambda · Σ|g| / numel(g)`` over every gate of the adapter."""
    gates = [d.gate for _, d in _deltas(model, name)]
    total = sum(g.numel() for g in gates)
    return adapter_state(model).configs[name].sparse_lambda * sum(g.abs().sum() for g in gates) / total


def sora_on_step(model: nn.Module, name: str, step: int, total_steps: int) -> bool:
    """The proximal step on the gates (soft threshold ξ); False: what trains stays the same."""
    xi = adapter_state(model).configs[name].threshold(step, total_steps)
    if xi > 0:
        for _, delta in _deltas(model, name):
            delta.proximal_step(xi)
    return False


def rank_distribution(model: nn.Module, name: str) -> dict[str, int]:
    """Live (non-zero-gate) ranks per adapted module: the rank each gets in the pruned export."""
    return {path: int(d.live_ranks().numel()) for path, d in _deltas(model, name)}


def sora_to_lora(model: nn.Module, name: str):
    """Prune zero-gate ranks into a plain LoRA: ``A' = A[live]``, ``B' = B[:, live] · g[live] · s / (α / r')``,
    r' = #live per module (``rank_pattern``); modules with no live rank are left out."""
    config = adapter_state(model).configs[name]

    def factors(d: SoraLinear):
        live = d.live_ranks()
        if live.numel() == 0:
            return None
        fold = d.scaling / (config.lora_alpha / live.numel())
        return d.lora_A.weight[live], d.lora_B.weight[:, live] * d.gate[0, live] * fold

    return export_plain_lora(model, name, factors, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "sora", config=SoraConfig, build=build_sora, param_groups=sora_param_groups, extra_loss=sora_extra_loss,
    on_step=sora_on_step, to_lora=sora_to_lora,
    description="LoRA with a gate per rank, sparsified by a proximal L1 step; zeroed ranks pruned on export.",
    paper="Ding et al. 2023 (EMNLP), arXiv:2311.11696",
    variants={"sora": {}, "sora_schedule": {"sparse_lambda_2": 1e-3, "max_lambda": 1e-2, "lambda_num": 4,
                                            "lambda_schedule": "linear"}},
)
