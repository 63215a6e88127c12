"""SMoRA — "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning",
Zhao et al., arXiv:2501.15103.

One LoRA of rank R whose ranks are the experts; each token activates k of them:

    y = W x + s · B · diag(g(x)) · A · dropout(x),    g(x) = Softmax(TopK_k(x W_gᵀ + b))

``A ∈ R^{R×in}``, ``B ∈ R^{out×R}``, ``W_g ∈ R^{R×in}`` (router, no learned bias). ``b`` is a non-trainable
balancing bias in the style of DeepSeek-V3's auxiliary-loss-free balancing: it is added to the router
scores only to *choose* the k ranks; the gate values are the softmax of the *unbiased* scores of the chosen
ranks. After every optimizer step (``on_step``) each layer updates ``b_i ← b_i + u · sign(ē − e_i)``, where
``e_i`` is how many (non-padding) tokens chose rank i during that step and ``ē`` the mean over ranks.

No official code was released; this follows the paper's formulas as summarised above, and every detail
below is our choice, unverified against the authors' implementation:

- the bias enters selection only (as in DeepSeek-V3), not the gate values;
- the load counts every micro-batch of the step and excludes padding (the routing context's token mask);
- the router is an ``nn.Linear(in, R, bias=False)`` initialised N(0, 0.02²) with float32 logits;
- scaling ``s = α / k``: per token the update is a rank-k LoRA, so LoRA's ``α / r`` is taken with r = k, the
  rank actually used. With ``α / R`` the update would shrink R/k-fold (8× for 8-of-64) just by adding
  inactive ranks, while the paper compares methods at equal *activated* parameters.
- ``A`` as nn.Linear would initialise it (Kaiming-uniform, a=√5), ``B`` zero: the adapter starts as the base.

Kernel: the gate is a dense (tokens, R) matrix with exact zeros off the top-k, so the forward is the two
GEMMs of a rank-R LoRA (``mixtures.experts.rank_block_delta``), exact and loop-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..mixtures.base import MixtureDelta, mixture_deltas, token_mask_for
from ..mixtures.experts import rank_block_delta
from ..mixtures.router import Router


@dataclass
class SmoraConfig(AdapterConfig):
    r: int = 64  # R: total ranks = experts
    top_k: int = 8  # k: ranks active per token
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    bias_update_rate: float = 1e-3  # u in b_i ← b_i + u·sign(ē − e_i); 0 turns balancing off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0 or not 0 < self.top_k <= self.r:
            raise ConfigError(f"SmoraConfig: need r > 0 and 0 < top_k <= r (got r={self.r}, top_k={self.top_k}).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"SmoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.bias_update_rate < 0:
            raise ConfigError(f"SmoraConfig.bias_update_rate must be >= 0, got {self.bias_update_rate}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.top_k


class SmoraLinear(MixtureDelta):
    """A rank-R LoRA whose R rank-one units are routed per token, k at a time."""

    keeps_aux_records = False

    def __init__(self, info: LayerInfo, config: SmoraConfig):
        super().__init__(info, config.r)
        self.r = config.r
        self.top_k = config.top_k
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, info.in_features))  # (R, in)
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, config.r))  # (out, R)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.router = Router(info.in_features, config.r, strategy="topk", top_k=config.top_k, selection_bias=True)
        # Tokens per rank since the last bias update; an integer buffer so that casting the adapter to
        # half precision never rounds the counts.
        self.register_buffer("pending_load", torch.zeros(config.r, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        routed = self.router(x)  # weights (N, R): softmax over the k chosen ranks, exact 0 elsewhere
        self.observe(routed, x.shape)  # statistics and traces only: keeps_aux_records is False (no aux loss)
        if self.training:
            with torch.no_grad():
                mask = token_mask_for(routed.selected.shape[0])
                chosen = routed.selected if mask is None else routed.selected & mask[:, None]
                self.pending_load += chosen.sum(0)
        gate = routed.weights.to(x.dtype) * self.scaling  # (N, R)
        flat = self.lora_dropout(x).reshape(-1, x.shape[-1])  # (N, in)
        return rank_block_delta(flat, self.lora_A, self.lora_B, gate).reshape(base_out.shape).to(base_out.dtype)

    @torch.no_grad()
    def update_selection_bias(self, rate: float) -> None:
        """``b_i ← b_i + u·sign(ē − e_i)`` from the loads seen since the last call, then reset the count."""
        load = self.pending_load.double()
        if load.sum() > 0:
            step = torch.sign(load.mean() - load) * rate
            self.router.selection_bias += step.to(self.router.selection_bias.dtype)
        self.pending_load.zero_()


def build_smora(base_layer: nn.Module, info: LayerInfo, config: SmoraConfig, path: str = "") -> SmoraLinear:
    return SmoraLinear(info, config)


def smora_on_step(model: nn.Module, name: str, step: int, total_steps: int) -> None:
    from ..core.model import adapter_state

    rate = adapter_state(model).configs[name].bias_update_rate
    for _, _, delta in mixture_deltas(model, name):
        if isinstance(delta, SmoraLinear):
            delta.update_selection_bias(rate)


register_method(
    "smora", config=SmoraConfig, build=build_smora, on_step=smora_on_step, mergeable=False,
    description="Every rank of one LoRA is an expert: top-k of R ranks per token, bias-balanced (no aux loss).",
    paper="Zhao et al. 2025, arXiv:2501.15103",
    variants={"smora": {"r": 8, "top_k": 2, "lora_alpha": 4}},
)
