"""DyLoRA — "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation", Valipour et al., arXiv:2210.07558.

One LoRA of rank ``r`` (= r_max) trained so that every prefix of its ranks is itself a good LoRA. Each step
draws ``b ~ U{1..r}`` (the same b in every layer) and trains the truncated adapter

    Δ_b(x) = (α / b) · B[:, :b] A[:b, :] dropout(x)

(the official ``dynamic`` module scales A and B each by √(r/b) on top of α/r, i.e. α/b in total). With
``frozen_lower_ranks`` (the paper's "frozen" mode) ranks ``1..b-1`` are detached, so only the b-th unit gets a
gradient that step. Evaluation, merging, serving and export use one fixed rank ``rank`` (config; default
``r``): ``lorakit eval|generate|export --rank b`` picks any ``b ≤ r`` from the same file.

Follows the official code, ``huawei-noah/Efficient-NLP`` ``DyLoRA/loralib/DyLoRA.py`` (class ``dynamic``:
``inputs[:, :rank+1] * sqrt(maximum_rank / (rank+1))``, the ``frozen`` branch ``.detach()``es ``[:, :rank]``) and
``DyLoRA/loralib/layers.py`` (``Linear``: A Kaiming-uniform(a=√5), B = 0, ``scaling = lora_alpha / r``). The rank
is drawn uniformly (the paper's p_B; official ``run_glue.py`` callback, ``randint`` over r_max values, used as
``rank+1``). Our choices: the draw for step t+1 happens in ``on_step`` after step t from torch's RNG, and the
very first step trains at b = r; the drawn b lives in the non-trainable buffer ``train_rank`` saved with
the adapter, so a checkpoint (which also holds the RNG state) resumes the rank sequence exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, field_error
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.model import adapter_layers, adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora


@dataclass
class DyLoraConfig(AdapterConfig):
    """DyLoRA fields.

    - ``r``: the maximum rank r_max (ranks b ~ U{1..r} are trained). ``lora_alpha``: scaling numerator (alpha / b).
    - ``lora_dropout``: dropout on the adapter's input during training, in [0, 1).
    - ``frozen_lower_ranks``: only the b-th unit gets gradients each step (the paper's frozen mode).
    - ``rank``: the rank used outside training (eval, merge, serve, export; ``--rank``), None = r.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    frozen_lower_ranks: bool = True
    rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise field_error(self, "r", f" (the maximum rank) must be a positive integer, got {self.r}.")
        if self.rank is not None and not 1 <= self.rank <= self.r:
            raise field_error(self, "rank", f"={self.rank} must be in 1..r={self.r} (a DyLoRA serves any rank up to "
                                            "the one it was trained with).")


class DyLoraLinear(Delta):
    """Nested-rank LoRA: trains at the sampled ``train_rank``, evaluates at ``eval_rank``."""

    def __init__(self, info: LayerInfo, config: DyLoraConfig):
        super().__init__(info)
        self.r = config.r
        self.lora_alpha = config.lora_alpha
        self.frozen_lower_ranks = config.frozen_lower_ranks
        self.eval_rank = config.rank or config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(info.in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, info.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.register_buffer("train_rank", torch.tensor(config.r, dtype=torch.long))  # b of the next step

    def factors(self, b: int, detach_lower: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:b]`` (b, in) and ``B[:, :b]`` (out, b); with ``detach_lower`` units 1..b-1 carry no gradient."""
        A, B = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        if detach_lower:
            A = torch.cat([A[:-1].detach(), A[-1:]], dim=0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        b = int(self.train_rank) if self.training else self.eval_rank
        A, B = self.factors(b, detach_lower=self.training and self.frozen_lower_ranks)
        x = self.lora_dropout(x.to(A.dtype))
        return (F.linear(F.linear(x, A), B) * (self.lora_alpha / b)).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.factors(self.eval_rank)
        return (B.float() @ A.float()) * (self.lora_alpha / self.eval_rank)

    def units(self) -> RankUnits:
        A, B = self.factors(self.eval_rank)
        return RankUnits(A=A, B=B, scaling=self.lora_alpha / self.eval_rank)


def build_dylora(base_layer: nn.Module, info: LayerInfo, config: DyLoraConfig, path: str = "") -> DyLoraLinear:
    return DyLoraLinear(info, config)


def _deltas(model: nn.Module, name: str) -> list[DyLoraLinear]:
    return [layer.adapters[name] for _, layer in adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], DyLoraLinear)]


def set_rank(model: nn.Module, name: str, rank: int) -> None:
    """Use rank ``rank`` (1..r) for adapter ``name`` outside training (eval, merge, serve, export). Raises
    ConfigError for a rank out of range; unmerge first if the adapter is merged."""
    from dataclasses import replace

    state = adapter_state(model)
    state.configs[name] = replace(state.configs[name], rank=rank)  # validates 1 <= rank <= r
    for delta in _deltas(model, name):
        delta.eval_rank = rank


def dylora_on_step(model: nn.Module, name: str, step: int, total_steps: int) -> bool:
    """Draw the rank of the next step, ``b ~ U{1..r}``, one b for every layer (from torch's RNG). False: what
    trains stays the same (the forward masks the units above b)."""
    deltas = _deltas(model, name)
    if deltas:
        b = int(torch.randint(1, deltas[0].r + 1, ()))
        for delta in deltas:
            delta.train_rank.fill_(b)
    return False


def dylora_to_lora(model: nn.Module, name: str):
    """The adapter at its current rank b as a plain PEFT LoRA: ``r = b``, ``lora_alpha = α`` (PEFT's α/b)."""
    config = adapter_state(model).configs[name]
    return export_plain_lora(model, name, lambda d: d.factors(d.eval_rank), lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout)


register_method(
    "dylora", config=DyLoraConfig, build=build_dylora, on_step=dylora_on_step, to_lora=dylora_to_lora,
    description="Nested-rank LoRA: a rank b ~ U{1..r} trained per step; evaluate/serve/export at any b <= r.",
    paper="Valipour et al. 2023 (EACL), arXiv:2210.07558",
    variants={"dylora": {}, "dylora_rank2": {"rank": 2}},
)
