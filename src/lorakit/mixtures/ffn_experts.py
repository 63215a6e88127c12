"""MixLoRA's fused FFN expert kernel ("MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts", Li et al., arXiv:2404.15159; official code TUDB-Labs/MoE-PEFT ``mixlora``), shared by MixLoRA
and MoLE: E LoRA experts over one frozen FFN that all experts share, one router on the FFN input,

    FFN_e(x) = W_down'(act(W_gate' x) ⊙ W_up' x),   W' = W + s·B_e A_e,     y = Σ_{e ∈ sel(x)} w_e(x) · FFN_e(x)

``W_gate x`` and ``W_up x`` are computed once for all tokens and only the experts' LoRA terms per (token, expert)
assignment, assignments grouped by expert with one segment matmul per LoRA factor (``ExpertRows``; no loop over
experts). The down projection is linear and a token's weights sum to 1, so the frozen ``W_down`` runs once on
``Σ_e w_e h_e``. The method chooses the router and the routing policy (``mixtures.router``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import LayerInfo, describe_layer
from .base import MixtureDelta, token_mask_for
from .experts import Dispatch
from .ffn import ffn_spec
from .router import CapacityTop1, Router, RouterOutput


# -- expert rows: token→expert assignments grouped by expert --------------------------------------------
class ExpertRows:
    """Each (token, expert) assignment as one row, rows grouped by expert, in one of two layouts:

    - packed (M rows, M = assignments): per-expert matmuls are one segment matmul (``F.grouped_mm``, rows of
      expert e between ``offs[e-1]`` and ``offs[e]``), so no FLOP or byte is spent on padding;
    - padded (E, C) slots, C = the busiest expert's load (``mixtures.experts.Dispatch``): one ``bmm``; padding
      slots read token 0 and carry weight 0. Used where ``grouped_mm`` is unavailable (older torch, CUDA
      without its kernel for these dtypes, rows not 16-byte aligned).

    With a router far from balanced (e.g. at initialisation) C is 2-3× the mean load, and the padded layout
    does 2-3× the elementwise work on (·, intermediate) tensors; hence the packed layout where possible.
    """

    def __init__(self, routed: RouterOutput, packed: bool):
        n_tokens, num_experts = routed.selected.shape
        d = Dispatch.from_selection(routed.selected)
        weight = routed.weights[d.token, d.expert]
        self.n_tokens, self.packed = n_tokens, packed
        if packed:
            self.token, self.weight, self.shape = d.token, weight, (-1,)
            self.offs = torch.bincount(d.expert, minlength=num_experts).cumsum(0).to(torch.int32)
        else:
            slots = num_experts * d.capacity
            self.token = torch.zeros(slots, dtype=torch.long, device=d.token.device).index_copy(0, d.slot, d.token)
            self.weight = weight.new_zeros(slots).index_copy(0, d.slot, weight)
            self.shape = (num_experts, d.capacity)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(N, k) per token → (rows..., k)."""
        return t.index_select(0, self.token).view(*self.shape, t.shape[-1])

    def matmul(self, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each row times its expert's matrix: rows (rows..., k), w (E, k, m) → (rows..., m)."""
        return F.grouped_mm(rows, w, offs=self.offs) if self.packed else torch.bmm(rows, w)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows..., k) → (N, k): the sum over each token's rows."""
        rows = rows.reshape(-1, rows.shape[-1])
        return rows.new_zeros(self.n_tokens, rows.shape[-1]).index_add(0, self.token, rows)


def packed_rows_supported(device: torch.device, dtype: torch.dtype, dims) -> bool:
    # CPU grouped_mm needs every row stride to be a multiple of 16 bytes; its CUDA kernel wants bf16 on
    # recent GPUs, where the padded bmm is fast anyway.
    return hasattr(F, "grouped_mm") and device.type == "cpu" and all(k * dtype.itemsize % 16 == 0 for k in dims)


# -- the FFN mixture ------------------------------------------------------------------------------------
class MixLoraFFN(MixtureDelta):
    """E LoRA experts over one frozen FFN (gated: gate/up/down; GPT-2: c_fc/c_proj), one router on its input.

    Expert parameters are stacked per host projection: ``lora_A[proj]`` (E, r, in), ``lora_B[proj]`` (E, out, r).
    """

    layer_kinds = ("ffn",)
    replaces_base = True
    packed_rows = True  # False forces the padded (E, C) layout (tests compare the two)

    def __init__(self, base_layer: nn.Module, info: LayerInfo, *, num_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float, router: Router, policy: Callable):
        super().__init__(info, num_experts)
        self.spec = ffn_spec(base_layer)
        self.r = r
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.router = router
        self.policy = policy
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in filter(None, (self.spec.gate, self.spec.up, self.spec.down)):
            proj = getattr(base_layer, name)
            proj_info = describe_layer(getattr(proj, "base_layer", proj))
            A = torch.empty(num_experts, r, proj_info.in_features)
            for e in range(num_experts):  # each expert's A as its own nn.Linear would be initialised
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(num_experts, proj_info.out_features, r))
        self._dims = (info.in_features, self.lora_A[self.spec.down].shape[-1], r)  # d, intermediate, r

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Routing of x (..., d): dense (N, E) weights and selection, N = tokens."""
        mask = token_mask_for(x[..., 0].numel())
        return self.policy(self.router(x), x.shape[:-1], mask)

    def _primed(self, rows: ExpertRows, name: str, xs: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """``base + s·B_e A_e dropout(x)`` for each row's expert e."""
        h = rows.matmul(self.lora_dropout(xs), self.lora_A[name].transpose(1, 2)) * self.scaling  # (rows..., r)
        y = rows.matmul(h, self.lora_B[name].transpose(1, 2))
        return y if base is None else base + y

    def full_forward(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        spec, dtype = self.spec, self.lora_A[self.spec.up].dtype
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        routed = self.route(x)
        self.observe(routed, x.shape)
        act = getattr(base_layer, spec.act)
        # The frozen projections, once for all tokens (the host's own modules, in the host's dtype).
        up = getattr(base_layer, spec.up)(flat)  # (N, I)
        gate = getattr(base_layer, spec.gate)(flat) if spec.gate else None

        rows = ExpertRows(routed, self.packed_rows and packed_rows_supported(x.device, dtype, self._dims))
        xs = rows.gather(flat).to(dtype)  # (rows..., d)
        up_e = self._primed(rows, spec.up, xs, rows.gather(up).to(dtype))  # (rows..., I)
        if gate is not None:
            h_e = act(self._primed(rows, spec.gate, xs, rows.gather(gate).to(dtype))) * up_e
        else:
            h_e = act(up_e)
        h_e = h_e * rows.weight.view(*rows.shape, 1).to(dtype)  # w_e h_e: both down terms are linear in it
        h = rows.combine(h_e)  # (N, I) Σ_e w_e h_e
        down_delta = rows.combine(self._primed(rows, spec.down, h_e, None))  # (N, d) Σ_e w_e s B_e A_e h_e
        unrouted = ~routed.selected.any(-1)
        if isinstance(self.policy, CapacityTop1):  # tokens over capacity: the plain base FFN
            h_base = act(gate) * up if gate is not None else act(up)
            h = torch.where(unrouted[:, None], h_base.to(dtype), h)
        down = getattr(base_layer, spec.down)
        out = down(h.to(x.dtype)).to(dtype) + down_delta  # W_down linear and Σ_e w_e = 1: one base GEMM
        bias = getattr(getattr(down, "base_layer", down), "bias", None)
        if bias is not None:  # Σ_e w_e b has value b; keep the weights' gradient through it
            w_sum = routed.weights.to(dtype).sum(-1) + unrouted.to(dtype)
            out = out + (w_sum - w_sum.detach())[:, None] * bias.to(dtype)
        out = out.to(x.dtype).view(*x.shape[:-1], -1)
        return getattr(base_layer, spec.dropout)(out) if spec.dropout else out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.full_forward(x, base_layer) - base_out
