"""SMoRA — "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning",
Zhao et al., arXiv:2501.15103.

One LoRA of rank R whose ranks are the experts; each token activates k of them:

    s(x) = sigmoid(W_g dropout(x)) + b                      (R scores; b: non-trainable balancing bias)
    K(x) = TopK_k(s(x)),   ĝ_i = k · s_i / Σ_{j∈K} s_j for i ∈ K, 0 elsewhere
    y = W x + (α / k) · B · diag(ĝ(x)) · A · dropout(x)

``A ∈ R^{R×in}``, ``B ∈ R^{out×R}``, ``W_g ∈ R^{R×in}`` (router, no bias). Balancing (DeepSeek-V3-style,
auxiliary-loss-free): in every training forward each layer counts how many tokens chose rank i (``c_i``) and
updates ``b_i ← b_i + u · sign(c̄ − c_i)`` with ``u = bias_update_rate`` (1e-5).

Follows the official code, StyxXuan/smora ``packages/peft/src/peft/tuners/srmole/layer.py``
(``SRMoLELinear.forward``, ``SRMoLELayer.update_layer``), whose behaviour the paper's formulas leave open:

- the bias is added to the sigmoid scores and the kept *biased* scores are the gate values, normalised to sum
  to 1 and multiplied by k; the output is scaled by α / k (``scaling = lora_alpha / activate_r``). Per token the
  update is therefore ``α · Σ_{i∈K} (s_i / Σ_K s) b_i a_iᵀ x``: a rank-k LoRA at LoRA's usual α / r with r = k;
- the bias moves in every training forward (not once per optimizer step), from the counts of that forward's
  tokens at that layer, padding included (the official counts every position); rate 1e-5, the code's default;
- the router sees the dropped-out input, like A; it is an ``nn.Linear`` initialised as PyTorch does
  (Kaiming-uniform, a = √5), as are the rows of ``A``; ``B`` is zero, so the adapter starts as the base.

Our only choices: scores in float32 (the official computes them in the layer's dtype), and the official
``rank_partition`` (ranks sharing one score) is not offered (its default, 1, is what the paper and scripts use).

Kernel: the gate is a dense (tokens, R) matrix with exact zeros off the top-k, so the forward is the two
GEMMs of a rank-R LoRA (``mixtures.experts.rank_block_delta``), exact and loop-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpointing import recomputing
from ..core.config import AdapterConfig, check_non_negative, check_positive_ints, field_error
from ..core.delta import LayerInfo
from ..core.parallel import sum_across
from ..core.registry import register_method
from ..mixtures.base import MixtureDelta
from ..mixtures.experts import rank_block_delta
from ..mixtures.router import RouterOutput


@dataclass
class SmoraConfig(AdapterConfig):
    """SMoRA's options: ``r`` ranks, each an expert, of which ``top_k`` are active per token; ``lora_alpha`` (output
    scaled by alpha / k); ``lora_dropout`` on the input; ``bias_update_rate``: step u of the load-balancing bias
    (0: no balancing)."""

    r: int = 64  # R: total ranks = experts
    top_k: int = 8  # k: ranks active per token (the official ``activate_r``)
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    bias_update_rate: float = 1e-5  # u in b_i ← b_i + u·sign(c̄ − c_i), every training forward; 0: no balancing

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        if not 0 < self.top_k <= self.r:
            raise field_error(self, "top_k", f" must be in 1..r={self.r} (the ranks it picks from), got {self.top_k}.")
        check_non_negative(self, "bias_update_rate", finite=True)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.top_k


class SmoraRouter(nn.Module):
    """Sigmoid scores of the R ranks plus the balancing bias, top-k on the biased scores."""

    def __init__(self, in_features: int, r: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(in_features, r, bias=False)  # PyTorch's default init, as the official router
        self.register_buffer("selection_bias", torch.zeros(r))  # saved with the adapter
        self.top_k = top_k
        self.bias_before_update: torch.Tensor | None = None  # what the last training forward routed with

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x (N, in) → weights (N, R): the kept biased scores normalised to sum to 1 (0 off the top-k). A checkpointed
        block's recompute (``core.checkpointing.recomputing``) routes with the bias its forward saw, before that
        forward's update."""
        bias = self.bias_before_update if recomputing() and self.bias_before_update is not None \
            else self.selection_bias
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))  # (N, R)
        biased = scores + bias.float()
        kept, indices = biased.topk(self.top_k, dim=-1)  # (N, k)
        weights = torch.zeros_like(biased).scatter(-1, indices, kept / kept.sum(-1, keepdim=True))
        selected = torch.zeros_like(biased, dtype=torch.bool).scatter(-1, indices, True)
        return RouterOutput(logits=biased, probs=scores / scores.sum(-1, keepdim=True), weights=weights,
                            selected=selected)

    @torch.no_grad()
    def update_bias(self, selected: torch.Tensor, rate: float) -> None:
        """``b_i ← b_i + u·sign(c̄ − c_i)`` from this forward's per-rank token counts ``c``; in a data-parallel run
        ``c`` counts every process's tokens (``core.parallel.sum_across``), so the bias stays the same everywhere."""
        counts = sum_across(selected.sum(0, dtype=torch.float32))  # (R,)
        self.bias_before_update = self.selection_bias.clone()
        self.selection_bias += (rate * torch.sign(counts.mean() - counts)).to(self.selection_bias.dtype)


class SmoraLinear(MixtureDelta):
    """A rank-R LoRA whose R rank-one units are routed per token, k at a time."""

    keeps_aux_records = False  # no auxiliary loss

    def __init__(self, info: LayerInfo, config: SmoraConfig):
        super().__init__(info, config.r)
        self.r = config.r
        self.top_k = config.top_k
        self.scaling = config.scaling
        self.bias_update_rate = config.bias_update_rate
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, info.in_features))  # (R, in)
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, config.r))  # (out, R)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.router = SmoraRouter(info.in_features, config.r, config.top_k)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        flat = self.lora_dropout(x).reshape(-1, x.shape[-1])  # (N, in): the router sees the dropped input too
        routed = self.router(flat)
        self.observe(routed, x.shape)  # statistics and traces only
        if self.training and self.bias_update_rate > 0 and not recomputing():  # the forward moved it already
            self.router.update_bias(routed.selected, self.bias_update_rate)
        gate = routed.weights.to(x.dtype) * (self.top_k * self.scaling)  # (N, R): ĝ · α/k
        return rank_block_delta(flat, self.lora_A, self.lora_B, gate).reshape(base_out.shape).to(base_out.dtype)


def build_smora(base_layer: nn.Module, info: LayerInfo, config: SmoraConfig, path: str = "") -> SmoraLinear:
    return SmoraLinear(info, config)


register_method(
    "smora", config=SmoraConfig, build=build_smora, mergeable=False,
    description="Every rank of one LoRA is an expert: top-k of R ranks per token, bias-balanced (no aux loss).",
    paper="Zhao et al. 2025, arXiv:2501.15103",
    variants={"smora": {"r": 8, "top_k": 2, "lora_alpha": 4}},
)
