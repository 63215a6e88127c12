"""Batched expert kernels: no Python loop over experts.

- ``rank_block_delta``: experts that are rank blocks of one wide LoRA (``A`` stacked (R, in), ``B`` (out, R),
  ``owner[R]`` = expert of each rank). A per-token rank gate (expert weight × per-expert scaling, 0 where not
  selected) multiplies the shrunk activations: two GEMMs whatever the number of experts. Exact: unselected
  experts contribute exact zeros. This is SMoRA's observation ("a multi-LoRA MoE is one LoRA with block-wise
  rank activation") used as the kernel for MoLA, SMoRA, MeteoRA, X-LoRA and the routed LoRAs. It computes
  every expert's shrink; for LoRA-sized experts (R = E·r ≪ d) this costs less than gathering.
- ``Dispatch``: sort token→expert assignments by expert into padded (E, C, ·) slots (C = the busiest expert's
  load), so each expert's computation is one ``bmm``; ``combine`` scatters the weighted results back.
  Used where experts are non-linear blocks (MixLoRA / MoLE expert FFNs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rank_block_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank_gate: torch.Tensor) -> torch.Tensor:
    """``Σ_e g_e(x) s_e B_e A_e x`` for x (..., in), A (R, in), B (out, R), rank_gate (..., R) broadcastable."""
    h = F.linear(x, A)  # (..., R)
    return F.linear(h * rank_gate, B)  # (..., out)


def expand_to_ranks(weights: torch.Tensor, owner: torch.Tensor, rank_scaling: torch.Tensor | None = None) -> torch.Tensor:
    """(…, E) expert weights → (…, R) rank gates via each rank's owner, times the per-rank scaling."""
    g = weights.index_select(-1, owner)
    return g * rank_scaling if rank_scaling is not None else g


@dataclass
class Dispatch:
    """Token→expert assignments grouped by expert: slot ``expert * capacity + position``."""

    token: torch.Tensor  # (M,) token index of each assignment, sorted by expert
    expert: torch.Tensor  # (M,)
    slot: torch.Tensor  # (M,) flat slot in the (E * C) buffer
    num_experts: int
    capacity: int

    @classmethod
    def from_selection(cls, selected: torch.Tensor) -> "Dispatch":
        n_tokens, num_experts = selected.shape
        expert_major = selected.T  # (E, N): nonzero() then lists assignments expert by expert, tokens in order
        expert, token = expert_major.nonzero(as_tuple=True)
        counts = torch.bincount(expert, minlength=num_experts)
        capacity = int(counts.max()) if expert.numel() else 0
        starts = torch.cumsum(counts, 0) - counts  # first assignment of each expert
        position = torch.arange(expert.numel(), device=selected.device) - starts[expert]
        return cls(token=token, expert=expert, slot=expert * capacity + position, num_experts=num_experts,
                   capacity=capacity)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) → (E, C, d), zero-padded."""
        buf = x.new_zeros(self.num_experts * self.capacity, x.shape[-1])
        buf = buf.index_copy(0, self.slot, x.index_select(0, self.token))
        return buf.view(self.num_experts, self.capacity, x.shape[-1])

    def combine(self, y: torch.Tensor, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(E, C, d) expert outputs → (N, d): Σ over each token's experts of weight × output."""
        flat = y.reshape(self.num_experts * self.capacity, y.shape[-1]).index_select(0, self.slot)
        w = weights[self.token, self.expert].to(flat.dtype)[:, None]
        out = flat.new_zeros(n_tokens, y.shape[-1])
        return out.index_add(0, self.token, flat * w)


def expert_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """Per-expert LoRA on dispatched slots: x (E, C, in), A (E, r, in), B (E, out, r) → (E, C, out)."""
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2)) * scaling
