"""MixLoRA — "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts",
Li et al., arXiv:2404.15159.

Every FFN becomes a sparse mixture of E experts that share the frozen FFN weights; expert e adds its own LoRA
to each projection (``W' = W + (α/r)·B_e A_e``):

    FFN_e(x) = W_down'(act(W_gate' x) ⊙ W_up' x)        y = Σ_{e ∈ sel(x)} w_e(x) · FFN_e(x)

with ``w = renormalised top-k of softmax(W_g x)`` (k=2 of 8; router in float32, init N(0, 0.02)). The attention
projections get ONE shared plain LoRA (not experts). Training adds the Mixtral load-balance loss
``E·Σ_e f_e·P̄_e`` over all layers' real tokens pooled, × ``router_aux_loss_coef``.

Follows the official code (TUDB-Labs/MoE-PEFT ``mixlora``): its three routers — ``"topk"`` (MixLoRA),
``"top_p"`` (MixLoRA-dynamic, p=0.8) and ``"switch"`` (top-1 with expert capacity, z-loss 0.001, jitter 0.01,
router init std 1.0) — and its fused operator: ``W_gate x`` and ``W_up x`` are computed once for all tokens and
only the experts' LoRA terms are computed per (token, expert) assignment, with assignments grouped by expert and
one segment matmul per LoRA factor (``ExpertRows``; no loop over experts). Because the down projection is linear
and a token's weights sum to 1, the frozen ``W_down`` is applied once to ``Σ_e w_e h_e``, not once per expert.

Choices where code, paper and README differ (all keep a fresh adapter exactly equal to the base model):

- ``router_aux_loss_coef`` = 0.001, the code default (the README's examples use 0.01).
- top-p: the code keeps the unnormalised probabilities (so at init the FFN output shrinks to the kept mass,
  ≥ 0.8); we renormalise over the kept experts, as top-k does.
- switch: the code multiplies the expert output by the top-1 probability p; we use the straight-through weight
  ``1 + p − sg(p)`` (value 1, gradient of p), so the task loss still trains the router as in Switch Transformers
  while a fresh adapter equals the base and dropped tokens are on the same scale as routed ones. Capacity is per
  sequence, as in the code (cumsum over positions; here padding tokens take no slot): ``expert_capacity`` if set, else
  ``ceil(capacity_factor · seq_len / E)`` (MoE-PEFT's template fixes 32). Tokens over capacity get the plain
  base FFN. ``routing="topk"`` with ``top_k=1`` uses the same straight-through weight (renormalised it would be a
  constant 1 with no gradient).
- GPT-2's residual dropout after ``c_proj`` is applied once to the mixed output (as the host applies it).
- the z-loss (switch only) is pooled over all layers like the balance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo, describe_layer
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..mixtures.base import MixtureDelta, router_loss, token_mask_for
from ..mixtures.experts import Dispatch
from ..mixtures.ffn import ffn_spec
from ..mixtures.router import Router, RouterOutput, load_balance_loss
from .lora import LoraConfig, LoraLinear

ROUTINGS = ("topk", "top_p", "switch")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")  # "mlp": the whole FFN block ("ffn" layer kind)
SWITCH_DEFAULTS = {"router_init_range": 1.0, "jitter_noise": 0.01, "router_z_loss_coef": 0.001}
OTHER_DEFAULTS = {"router_init_range": 0.02, "jitter_noise": 0.0, "router_z_loss_coef": 0.0}


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA (MoE-PEFT template defaults). Fields left None take the routing's default (``SWITCH_DEFAULTS``
    for ``routing="switch"``, else ``OTHER_DEFAULTS``). ``expert_r``/``expert_lora_alpha`` give the experts
    their own rank (the code's ``expert_lora`` block); by default they use ``r``/``lora_alpha``.

    - ``lora_dropout``: dropout on the input of the attention LoRA and of every expert, in [0, 1).
    - ``num_experts``: LoRA experts per FFN block.
    - ``top_k``: experts each token uses (``routing="topk"``).
    - ``routing``: the router: ``topk`` (MixLoRA), ``top_p`` (dynamic: smallest set with probability ≥ top_p),
      ``switch`` (top-1 with capacity, Switch Transformer).
    - ``top_p``: probability mass a token's experts must reach (``routing="top_p"``), in (0, 1].
    - ``expert_capacity``: tokens one expert takes per batch (``switch``; None: from ``capacity_factor``).
    - ``capacity_factor``: expert capacity as a multiple of tokens / experts (``switch``).
    - ``router_init_range``: std of the router's normal init (None: the routing's default).
    - ``jitter_noise``: multiplicative input noise on the router during training (None: the routing's default).
    - ``router_aux_loss_coef``: weight of the load-balancing loss added to the task loss.
    - ``router_z_loss_coef``: weight of the router z-loss (None: the routing's default; 0: off).
    """

    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    expert_r: int | None = None
    expert_lora_alpha: float | None = None
    num_experts: int = 8
    top_k: int = 2
    routing: str = "topk"
    top_p: float = 0.8
    expert_capacity: int | None = None
    capacity_factor: float = 1.0
    router_init_range: float | None = None
    jitter_noise: float | None = None
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.routing not in ROUTINGS:
            raise ConfigError(f"MixLoraConfig.routing={self.routing!r}: choose one of {ROUTINGS} "
                              "('top_p' is MixLoRA-dynamic, 'switch' is MixLoRA-switch).")
        for name in ("r", "num_experts", "top_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"MixLoraConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.expert_r is not None and self.expert_r <= 0:
            raise ConfigError(f"MixLoraConfig.expert_r must be a positive integer or None, got {self.expert_r}.")
        if self.top_k > self.num_experts:
            raise ConfigError(f"MixLoraConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"MixLoraConfig.top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"MixLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if (self.expert_capacity is not None and self.expert_capacity <= 0) or self.capacity_factor <= 0:
            raise ConfigError("MixLoraConfig.expert_capacity and capacity_factor must be positive "
                              f"(got {self.expert_capacity}, {self.capacity_factor}).")
        for name, value in (SWITCH_DEFAULTS if self.routing == "switch" else OTHER_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def attention_lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)


# -- routing policies: RouterOutput → the weights the experts are combined with ---------------------------
def renormalized(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    """Weights of the selected experts rescaled to sum to 1 (top-p; top-k already is)."""
    weights = out.weights / out.weights.sum(-1, keepdim=True).clamp_min(1e-9)
    return RouterOutput(out.logits, out.probs, weights, out.selected)


def straight_through(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    """Top-1 weight of value exactly 1 whose gradient is the gate probability's: ``(p − sg(p)) + 1``."""
    weights = torch.where(out.selected, (out.probs - out.probs.detach()) + 1.0, torch.zeros_like(out.probs))
    return RouterOutput(out.logits, out.probs, weights, out.selected)


def unchanged(out: RouterOutput, lead_shape, mask) -> RouterOutput:
    return out


@dataclass
class CapacityTop1:
    """Switch routing: each token's argmax expert, at most C tokens per expert and sequence (earlier positions
    first; padding takes no slot), C = ``capacity`` or ``ceil(factor · seq_len / E)``; straight-through weight."""

    capacity: int | None
    factor: float

    def __call__(self, out: RouterOutput, lead_shape, mask) -> RouterOutput:
        n_experts = out.probs.shape[-1]
        seq_len = lead_shape[-1] if len(lead_shape) else 1
        cap = self.capacity or math.ceil(self.factor * seq_len / n_experts)
        onehot = F.one_hot(out.probs.argmax(-1), n_experts)  # (N, E)
        counted = onehot if mask is None else onehot * mask[:, None]
        position = counted.view(-1, seq_len, n_experts).cumsum(1).view_as(onehot)  # 1-based within the sequence
        selected = onehot.bool() & (position <= cap)
        return straight_through(RouterOutput(out.logits, out.probs, out.probs * selected, selected), lead_shape, mask)


def routing_policy(config: MixLoraConfig) -> Callable:
    if config.routing == "switch":
        return CapacityTop1(config.expert_capacity, config.capacity_factor)
    if config.routing == "top_p":
        return renormalized
    return straight_through if config.top_k == 1 else unchanged


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
        n_tokens, n_experts = routed.selected.shape
        d = Dispatch.from_selection(routed.selected)
        weight = routed.weights[d.token, d.expert]
        self.n_tokens, self.packed = n_tokens, packed
        if packed:
            self.token, self.weight, self.shape = d.token, weight, (-1,)
            self.offs = torch.bincount(d.expert, minlength=n_experts).cumsum(0).to(torch.int32)
        else:
            slots = n_experts * d.capacity
            self.token = torch.zeros(slots, dtype=torch.long, device=d.token.device).index_copy(0, d.slot, d.token)
            self.weight = weight.new_zeros(slots).index_copy(0, d.slot, weight)
            self.shape = (n_experts, d.capacity)

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

    def __init__(self, base_layer: nn.Module, info: LayerInfo, *, n_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float, router: Router, policy: Callable):
        super().__init__(info, n_experts)
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
            A = torch.empty(n_experts, r, proj_info.in_features)
            for e in range(n_experts):  # each expert's A as its own nn.Linear would be initialised
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(n_experts, proj_info.out_features, r))
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


class SharedLora(LoraLinear):
    """The one plain LoRA shared by all tokens on the attention projections. Not mergeable on its own: merging
    only these layers would leave a MixLoRA/MoLE adapter half merged."""

    mergeable = False


def build_mixlora(base_layer: nn.Module, info: LayerInfo, config: MixLoraConfig, path: str = ""):
    if info.kind != "ffn":
        return SharedLora(info, config.attention_lora())
    strategy = "dense" if config.routing == "switch" else config.routing  # switch selects in CapacityTop1
    router = Router(info.in_features, config.num_experts, strategy=strategy, init_std=config.router_init_range,
                    jitter=config.jitter_noise, top_k=config.top_k, top_p=config.top_p)
    return MixLoraFFN(base_layer, info, n_experts=config.num_experts, r=config.expert_r or config.r,
                      lora_alpha=config.expert_lora_alpha or config.lora_alpha, lora_dropout=config.lora_dropout,
                      router=router, policy=routing_policy(config))


def mixlora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    return router_loss(model, name, load_balance_loss, config.router_aux_loss_coef, z_coef=config.router_z_loss_coef)


register_method(
    "mixlora", config=MixLoraConfig, build=build_mixlora, layer_kinds=("linear", "ffn"), extra_loss=mixlora_extra_loss,
    mergeable=False,
    description="Sparse mixture of LoRA experts over each frozen FFN (top-k / top-p / switch), shared attention LoRA.",
    paper="Li et al. 2024, arXiv:2404.15159",
    variants={"mixlora": {"num_experts": 4, "top_k": 2, "r": 4},
              "mixlora_dynamic": {"num_experts": 4, "r": 4, "routing": "top_p"},
              "mixlora_switch": {"num_experts": 4, "r": 4, "routing": "switch"}},
)
