"""Routers: a small gate module plus routing strategies (top-k, top-p, switch, dense) and balance losses.

A router maps token features ``x`` (N, d) to dense combination weights (N, E) and a selection mask (N, E).
Dense weights (zeros for unselected experts) let every expert kernel run as a batched matmul; the mask tells
which experts a token used (for dispatch, load statistics and the balance losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits: torch.Tensor  # (N, E) float32, before any selection
    probs: torch.Tensor  # (N, E) softmax(logits / temperature)
    weights: torch.Tensor  # (N, E) combination weights, 0 where not selected
    selected: torch.Tensor  # (N, E) bool


def _scatter(indices: torch.Tensor, values: torch.Tensor, num_experts: int):
    weights = torch.zeros(indices.shape[0], num_experts, dtype=values.dtype, device=values.device)
    weights = weights.scatter(1, indices, values)
    selected = torch.zeros_like(weights, dtype=torch.bool).scatter(1, indices, True)
    return weights, selected


def route_topk(logits, probs, *, top_k: int, renormalize: bool = True, **_):
    """Mixtral / MixLoRA / MoLA: softmax → top-k → renormalise over the k (MoLE: top-1 without renormalising)."""
    values, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        values = values / values.sum(-1, keepdim=True)
    return _scatter(indices, values, probs.shape[-1])


def route_topk_logits(logits, probs, *, top_k: int, temperature: float = 1.0, **_):
    """MeteoRA's fast path: top-k on the logits, then softmax over the k (k=1 gives weight 1)."""
    values, indices = logits.topk(top_k, dim=-1)
    return _scatter(indices, torch.softmax(values / temperature, dim=-1), probs.shape[-1])


def route_top_p(logits, probs, *, top_p: float, **_):
    """MixLoRA-dynamic: keep the most probable experts until their mass exceeds ``top_p``; no renormalisation."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the expert that crosses top_p is kept; always >= 1
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return probs * keep, keep


def route_switch(logits, probs, *, expert_capacity: int, **_):
    """Switch: top-1 with a per-expert capacity (tokens in order); over-capacity tokens get no expert."""
    top = probs.argmax(-1)  # (N,)
    onehot = F.one_hot(top, probs.shape[-1])
    position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based position of each token within its expert
    kept = position <= expert_capacity
    selected = onehot.bool() & kept[:, None]
    return probs * selected, selected


def route_dense(logits, probs, **_):
    """Soft mixture: every expert, weighted by its probability (LLaVA-MoLE's dense_moe, LoRAMoE)."""
    return probs, torch.ones_like(probs, dtype=torch.bool)


STRATEGIES: dict[str, Callable] = {"topk": route_topk, "topk_logits": route_topk_logits, "top_p": route_top_p,
                                   "switch": route_switch, "dense": route_dense}


class Router(nn.Module):
    """``logits = W x (+ b)`` in float32, then a routing strategy.

    ``jitter``: multiplicative uniform noise ``x · U(1-ε, 1+ε)`` during training (MixLoRA / Switch).
    """

    def __init__(self, in_features: int, num_experts: int, *, strategy: str = "topk", bias: bool = False,
                 init_std: float = 0.02, jitter: float = 0.0, temperature: float = 1.0,
                 **strategy_kwargs):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
        self.gate = nn.Linear(in_features, num_experts, bias=bias)
        nn.init.normal_(self.gate.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.gate.bias)
        self.num_experts = num_experts
        self.strategy = strategy
        self.jitter = jitter
        self.temperature = temperature
        self.strategy_kwargs = strategy_kwargs

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x = x.reshape(-1, x.shape[-1]).float()  # (N, d)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.gate.weight.float(), None if self.gate.bias is None else self.gate.bias.float())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        weights, selected = STRATEGIES[self.strategy](logits, probs, temperature=self.temperature,
                                                      **self.strategy_kwargs)
        return RouterOutput(logits=logits, probs=probs, weights=weights, selected=selected)


# -- balance losses (mask: (N,) bool of real tokens, or None) ----------------------------------------------
def _masked_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t.float().mean(0)
    m = mask.float()[:, None]
    return (t.float() * m).sum(0) / m.sum().clamp_min(1.0)


def load_balance_loss(probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral / Switch: ``E · Σ_e f_e · P̄_e`` with f_e the fraction of tokens routed to e (counting each of a
    token's k choices) and P̄_e the mean router probability; padding excluded. Equals k for uniform routing."""
    f = _masked_mean(selected, mask)
    p = _masked_mean(probs, mask)
    return probs.shape[-1] * (f * p).sum()


def argmax_balance_loss(probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformers' ``E · Σ_e f_e · P̄_e`` (Fedus et al. arXiv:2101.03961 eqs. 4-6) with f_e the fraction of
    tokens whose argmax expert is e, counted before the capacity drops them (MoE-PEFT
    ``_switch_load_balancing_loss_func`` recomputes the argmax from the probabilities); padding excluded."""
    argmax = F.one_hot(probs.argmax(-1), probs.shape[-1]).bool()
    return load_balance_loss(probs, argmax, mask)


def assignment_balance_loss(probs: torch.Tensor, selected: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoLA's ``E · Σ_e f_e · P̄_e`` with f_e = (assignments to e) / (all assignments): Mixtral's loss divided by
    k (GCYZSL/MoLA ``load_balancing_loss_func``); padding excluded. Equals 1 for uniform routing."""
    counts = (selected if mask is None else selected & mask[:, None]).float().sum(0)  # (E,)
    f = counts / counts.sum().clamp_min(1.0)
    return probs.shape[-1] * (f * _masked_mean(probs, mask)).sum()


def mole_balance_loss(probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LLaVA-MoLE: ``Σ_e mean(p_e) · mean(onehot_e)`` (no ×E factor)."""
    return (_masked_mean(selected, mask) * _masked_mean(probs, mask)).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)² — keeps router logits small."""
    lse = torch.logsumexp(logits, dim=-1) ** 2
    if mask is None:
        return lse.mean()
    return (lse * mask.float()).sum() / mask.float().sum().clamp_min(1.0)


BALANCE_LOSSES = {"mixtral": load_balance_loss, "switch": argmax_balance_loss, "mole": mole_balance_loss,
                  "mola": assignment_balance_loss}


# -- routing policies: RouterOutput → the weights the experts are combined with ----------------------------
# A policy is ``policy(out, lead_shape, mask) -> RouterOutput``: lead_shape the input's leading dims (batch, seq),
# mask (N,) bool of real tokens or None. MixLoRA picks one per routing strategy; MoLE uses straight_through /
# unchanged.
def renormalized(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    """Weights of the selected experts rescaled to sum to 1 (top-p; top-k already is)."""
    weights = out.weights / out.weights.sum(-1, keepdim=True).clamp_min(1e-9)
    return RouterOutput(out.logits, out.probs, weights, out.selected)


def straight_through(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    """Top-1 weight of value exactly 1 whose gradient is the gate probability's: ``(p − sg(p)) + 1``."""
    weights = torch.where(out.selected, (out.probs - out.probs.detach()) + 1.0, torch.zeros_like(out.probs))
    return RouterOutput(out.logits, out.probs, weights, out.selected)


def unchanged(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    """The router's own weights."""
    return out


@dataclass
class CapacityTop1:
    """Switch routing: each token's argmax expert, at most C tokens per expert and sequence (earlier positions
    first; padding takes no slot), C = ``capacity`` or ``ceil(factor · seq_len / E)``; straight-through weight."""

    capacity: int | None
    factor: float

    def __call__(self, out: RouterOutput, lead_shape, mask) -> RouterOutput:
        num_experts = out.probs.shape[-1]
        seq_len = lead_shape[-1] if len(lead_shape) else 1
        cap = self.capacity or math.ceil(self.factor * seq_len / num_experts)
        onehot = F.one_hot(out.probs.argmax(-1), num_experts)  # (N, E)
        counted = onehot if mask is None else onehot * mask[:, None]
        position = counted.view(-1, seq_len, num_experts).cumsum(1).view_as(onehot)  # 1-based within the sequence
        selected = onehot.bool() & (position <= cap)
        return straight_through(RouterOutput(out.logits, out.probs, out.probs * selected, selected), lead_shape, mask)
