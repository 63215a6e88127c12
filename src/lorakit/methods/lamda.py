"""LaMDA / LaMDA++ — "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
Azizi, Kundu & Pedram, EMNLP 2024 Findings, arXiv:2406.12832.

    Y = X W + α · X A S B     (paper; in lorakit's (out, in) layout: Δ(x) = s · B S A dropout(x), s = lora_alpha / r)

``A`` (r, in) the first projection (PMA), frozen from the start; ``S`` (r, r) the trainable low-dimensional adapter
(LDA); ``B`` (out, r) the second projection (PMB), trainable at first and frozen gradually, one rank component
(column) at a time, until only S trains. Trainable parameters after the freeze: r² per layer.

Sources and choices:

- Official code ``ArminAzizi98/LaMDA``: ``lamda.py`` ``get_lamda_model`` (lines 33-47) inserts
  ``sigma = nn.Linear(r, r)`` into a PEFT LoRA and freezes every ``lora_A``; ``forward_adapter`` (line 27) computes
  ``lora_B(sigma(lora_A(dropout(x)))) * scaling``. ``custom_trainer.py`` ``gradual_freeze_B`` (lines 3296-3305): after
  each backward, with ``t = int(total_iter / (eta · max_steps · grad_acc))``, ``eta = 0.3``, the gradient of B's first
  t columns is zeroed, and B gets ``requires_grad = False`` once ``t >= r``. Followed here: the forward, the frozen A,
  the column order (column k first frozen before k+1), gradient zeroing for frozen columns (so, as there, AdamW's
  momentum still moves them a little) and the whole-B freeze.
- The schedule follows the paper, not the code's constant: the paper freezes PMB "during the early fine-tuning
  stages" and "after t_i iterations PMB is completely frozen" (Fig. 1), which the code's rule reaches only for
  r ≤ 3 (one column per 0.3·max_steps). Here ``t(step) = min(r, ⌊step · r / (freeze_ratio · total_steps)⌋)``:
  the columns freeze at even intervals and B is frozen completely at ``freeze_ratio`` of the run (default 0.3, the
  code's eta; the paper's t_i value is not given).
- Initialisation ``init_weights="svd"`` (default, the paper: "spectrally decomposed", projections from the singular
  vectors of the pre-trained W = U Σ Vᵀ): ``A = V_rᵀ``, ``B = U_r``, columns ordered by decreasing singular value
  (so the most energetic directions freeze first, as the code's column order gives), and ``S = 0`` (our choice:
  ΔW = 0 at step 0 with the base untouched). ``init_weights="lora"`` is the released code: PEFT's LoRA init (A
  Kaiming-uniform, B = 0) with ``sigma`` Kaiming-uniform (nn.Linear's default).
- LaMDA++ (``lamda_pp``): the same delta with per-module ranks from the normalised energy of each layer's spectrum,
  ``e_m = Σ_{i≤r} σ_i² / Σ_i σ_i²``; the budget ``r · #modules`` is split in proportion to ``e_m`` (largest
  remainders, each rank in [1, min(in, out)]), stored as ``rank_pattern`` (module path → rank). The abstract names
  the normalised spectrum as the signal; the proportional rule is our reading (the released code has no LaMDA++).

Merge: ΔW = s·B S A is fixed. Export: ``to_lora`` writes ``lora_A = S A``, ``lora_B = B`` (per-module ranks as
PEFT's ``rank_pattern``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, check_positive_ints, check_range, field_error
from ..core.delta import LayerInfo, describe_layer, oriented_weight
from ..core.model import adapter_layers, adapter_state
from ..core.registry import register_method
from ..core.targeting import iter_host_modules, select_targets
from .nlora import MiddleLinear, middle_to_lora


@dataclass
class LamdaConfig(AdapterConfig):
    """LaMDA fields.

    - ``r``: size of the LDA S (r×r); ``lora_alpha``: s = lora_alpha / r; ``lora_dropout``: dropout on the input.
    - ``init_weights``: ``"svd"`` (A, B from W's top-r singular vectors, S = 0; the paper) or ``"lora"`` (the
      released code: A Kaiming, S Kaiming, B = 0).
    - ``freeze_ratio``: fraction of the training steps after which B is completely frozen (its columns freeze one
      by one before that), in (0, 1].
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    init_weights: Literal["svd", "lora"] = "svd"
    freeze_ratio: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        check_range(self, "freeze_ratio", 0, 1, low_open=True)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class LamdaPlusPlusConfig(LamdaConfig):
    """LaMDA++: LaMDA's fields; ``r`` is the mean rank. ``rank_pattern`` (module path → rank) is computed from the
    base weights' spectra when the adapter is added (leave it empty) and saved; a given pattern is used as is."""

    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = {k: v for k, v in self.rank_pattern.items() if v <= 0}
        if bad:
            raise field_error(self, "rank_pattern", f" ranks must be positive integers, got {bad}.")

    def for_module(self, module_name: str) -> "LamdaPlusPlusConfig":
        return replace(self, r=self.rank_pattern[module_name]) if module_name in self.rank_pattern else self


class LamdaLinear(MiddleLinear):
    """``Δ(x) = s · B S A dropout(x)`` with ``lora_A`` (r, in) frozen, ``sigma`` (r, r) trained, ``lora_B`` (out, r)
    trained except its first ``frozen_columns`` columns (a saved int64 buffer, advanced by ``lamda_on_step``)."""

    def __init__(self, info: LayerInfo, config: LamdaConfig):
        super().__init__(info, config, middle_name="sigma", frozen=("lora_A",))
        self.register_buffer("frozen_columns", torch.zeros((), dtype=torch.long))

    def frozen_names(self) -> Iterable[str]:
        whole_B = int(self.frozen_columns) >= self.r
        return ("lora_A.weight",) + (("lora_B.weight",) if whole_B else ())

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        B = self.lora_B.weight
        if B.requires_grad and torch.is_grad_enabled():  # frozen columns: no gradient (gradual_freeze_B)
            frozen = torch.arange(self.r, device=B.device) < self.frozen_columns  # (r,)
            B = torch.where(frozen, B.detach(), B)
        h = self.lora_A(self.lora_dropout(x.to(B.dtype)))  # (..., r)
        return (F.linear(self.sigma(h), B) * self.scaling).to(base_out.dtype)


@torch.no_grad()
def svd_init(delta: LamdaLinear, weight: torch.Tensor) -> None:
    """``A = V_rᵀ``, ``B = U_r`` from ``weight`` (out, in) = U Σ Vᵀ (decreasing σ), ``S = 0``."""
    U, _, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    delta.lora_A.weight.copy_(Vh[: delta.r])
    delta.lora_B.weight.copy_(U[:, : delta.r])
    nn.init.zeros_(delta.sigma.weight)


def build_lamda(base_layer: nn.Module, info: LayerInfo, config: LamdaConfig, path: str = "") -> LamdaLinear:
    delta = LamdaLinear(info, config)  # nn.Linear's default init: every factor Kaiming-uniform(a=√5)
    if config.init_weights == "svd":
        svd_init(delta, oriented_weight(base_layer, info).detach())
    else:
        nn.init.zeros_(delta.lora_B.weight)
    return delta


def columns_frozen(step: int, total_steps: int, r: int, freeze_ratio: float) -> int:
    """How many of B's columns are frozen after ``step`` of ``total_steps``: all of them at ``freeze_ratio``."""
    return min(r, math.floor(step * r / (freeze_ratio * max(total_steps, 1))))


def lamda_on_step(model: nn.Module, name: str, step: int, total_steps: int) -> bool:
    """Advance every delta's frozen columns; True when that froze (or thawed) the whole of some B, which changes
    ``frozen_names`` (the loop then re-reads what trains)."""
    ratio = adapter_state(model).configs[name].freeze_ratio
    changed = False
    for _, layer in adapter_layers(model):
        delta = layer.adapters[name] if name in layer.adapters else None
        if isinstance(delta, LamdaLinear):
            before = int(delta.frozen_columns) >= delta.r
            frozen = columns_frozen(step, total_steps, delta.r, ratio)
            delta.frozen_columns.fill_(frozen)
            changed = changed or before != (frozen >= delta.r)
    return changed


def energy(weight: torch.Tensor, r: int) -> float:
    """The normalised energy of the top-r part of ``weight``'s spectrum, ``Σ_{i≤r} σ_i² / Σ_i σ_i²``."""
    s2 = torch.linalg.svdvals(weight.float()) ** 2
    return float(s2[:r].sum() / s2.sum().clamp_min(1e-30))


def allocate_ranks(scores: dict[str, float], budget: int, caps: dict[str, int]) -> dict[str, int]:
    """Split ``budget`` ranks in proportion to ``scores`` (largest remainders), each in [1, caps[path]]."""
    total = sum(scores.values()) or 1.0
    raw = {p: budget * s / total for p, s in scores.items()}
    ranks = {p: math.floor(v) for p, v in raw.items()}
    for p in sorted(raw, key=lambda p: raw[p] - ranks[p], reverse=True)[: budget - sum(ranks.values())]:
        ranks[p] += 1
    return {p: max(1, min(caps[p], k)) for p, k in ranks.items()}


def prepare_lamda_pp(model: nn.Module, config: LamdaPlusPlusConfig) -> LamdaPlusPlusConfig:
    """Fill ``rank_pattern`` from the targets' spectra (kept as is when the config already has one, e.g. on load)."""
    if config.rank_pattern:
        return config
    host = dict(iter_host_modules(model))
    scores, caps = {}, {}
    for path in select_targets(model, config):
        info = describe_layer(host[path])
        if info is not None and info.kind == "linear":
            scores[path] = energy(oriented_weight(host[path], info).detach(), config.r)
            caps[path] = min(info.in_features, info.out_features)
    return replace(config, rank_pattern=allocate_ranks(scores, config.r * len(scores), caps))


PAPER = "Azizi et al. 2024 (EMNLP Findings), arXiv:2406.12832"
register_method(
    "lamda", config=LamdaConfig, build=build_lamda, on_step=lamda_on_step, to_lora=middle_to_lora, paper=PAPER,
    description="LaMDA: s·B S A with A frozen from W's SVD, the r×r S trained, B frozen column by column early on.",
    variants={"lamda": {"r": 4}, "lamda_code": {"r": 4, "init_weights": "lora"}},
)
register_method(
    "lamda_pp", config=LamdaPlusPlusConfig, build=build_lamda, prepare=prepare_lamda_pp, on_step=lamda_on_step,
    to_lora=middle_to_lora, paper=PAPER,
    description="LaMDA++: LaMDA with per-layer ranks split by the normalised energy of each weight's top-r spectrum.",
    variants={"lamda_pp": {"r": 4}},
)
