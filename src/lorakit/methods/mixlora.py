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
one segment matmul per LoRA factor (``mixtures.ffn_experts``: ``MixLoraFFN``, ``ExpertRows``; no loop over
experts). Because the down projection is linear and a token's weights sum to 1, the frozen ``W_down`` is applied
once to ``Σ_e w_e h_e``, not once per expert.

Choices where code, paper and README differ (all keep a fresh adapter exactly equal to the base model):

- ``router_aux_loss_coef`` = 0.001, the code default (the README's examples use 0.01).
- top-p: the code keeps the unnormalised probabilities (so at init the FFN output shrinks to the kept mass,
  ≥ 0.8); we renormalise over the kept experts, as top-k does.
- switch: the code multiplies the expert output by the top-1 probability p; we use the straight-through weight
  ``1 + p − sg(p)`` (value 1, gradient of p), so the task loss still trains the router as in Switch Transformers
  while a fresh adapter equals the base and dropped tokens are on the same scale as routed ones. Capacity is per
  sequence, as in the code (cumsum over positions; here padding tokens take no slot): ``expert_capacity`` if set, else
  ``ceil(capacity_factor · seq_len / E)`` (MoE-PEFT's template fixes 32). Tokens over capacity get the plain
  base FFN; the code (``SwitchSparseMoe.forward``, ``next_states = hidden_states.clone()``) gives them their own
  FFN *input* as the block's output, and in inference mode returns the input for every token (the experts' result
  is dropped), which we take for bugs. The switch balance loss counts each token's argmax expert before the
  capacity drops it, as the code (``_switch_load_balancing_loss_func``) and Switch Transformers' f_i do.
  ``routing_strategy="topk"`` with ``top_k=1`` uses the same straight-through weight (renormalised it
  would be a constant 1 with no gradient).
- GPT-2's residual dropout after ``c_proj`` is applied once to the mixed output (as the host applies it).
- the z-loss (switch only) is pooled over all layers like the balance loss. Padding is left out of every routing
  loss; the code masks it only in the top-k (Mixtral) loss, not in the top-p and switch losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.config import (AdapterConfig, check_non_negative, check_positive, check_positive_ints, check_range,
                           field_error)
from ..core.delta import LayerInfo
from ..core.registry import register_method
from ..mixtures.base import router_loss
from ..mixtures.ffn_experts import MixLoraFFN
from ..mixtures.router import (CapacityTop1, Router, argmax_balance_loss, load_balance_loss, renormalized,
                               straight_through, unchanged)
from .lora import LoraConfig, LoraLinear

ROUTING_STRATEGIES = ("topk", "top_p", "switch")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")  # "mlp": the whole FFN block ("ffn" layer kind)
SWITCH_DEFAULTS = {"router_init_range": 1.0, "jitter_noise": 0.01, "router_z_loss_coef": 0.001}
OTHER_DEFAULTS = {"router_init_range": 0.02, "jitter_noise": 0.0, "router_z_loss_coef": 0.0}


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA (MoE-PEFT template defaults). Fields left None take the routing strategy's default
    (``SWITCH_DEFAULTS`` for the switch strategy, else ``OTHER_DEFAULTS``). ``expert_r``/``expert_lora_alpha`` give
    the experts their own rank (the code's ``expert_lora`` block); by default they use ``r``/``lora_alpha``.

    - ``lora_dropout``: dropout on the input of the attention LoRA and of every expert, in [0, 1).
    - ``num_experts``: LoRA experts per FFN block.
    - ``top_k``: experts each token uses (strategy 'topk').
    - ``routing_strategy``: how the router picks experts: 'topk' (MixLoRA), 'top_p' (dynamic: smallest set with
      probability ≥ top_p), 'switch' (top-1 with capacity, Switch Transformer); MoE-PEFT's name, ``routing`` in
      files written before the rename.
    - ``top_p``: probability mass a token's experts must reach (strategy 'top_p'), in (0, 1].
    - ``expert_capacity``: tokens one expert takes per sequence (strategy 'switch'), None: from the capacity factor.
    - ``capacity_factor``: expert capacity as a multiple of tokens / experts (strategy 'switch').
    - ``router_init_range``: std of the router's normal init (None: the routing strategy's default).
    - ``jitter_noise``: multiplicative input noise on the router during training (None: the strategy's default).
    - ``router_aux_loss_coef``: weight of the load-balancing loss added to the task loss.
    - ``router_z_loss_coef``: weight of the router z-loss (None: the routing strategy's default; 0: off).
    """

    renamed_fields = {"routing": "routing_strategy"}

    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    expert_r: int | None = None
    expert_lora_alpha: float | None = None
    num_experts: int = 8
    top_k: int = 2
    routing_strategy: str = field(default="topk", metadata={"choices": ROUTING_STRATEGIES})
    top_p: float = 0.8
    expert_capacity: int | None = None
    capacity_factor: float = 1.0
    router_init_range: float | None = None
    jitter_noise: float | None = None
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise field_error(self, "routing_strategy", f"={self.routing_strategy!r}: choose one of "
                              f"{ROUTING_STRATEGIES} ('top_p' is MixLoRA-dynamic, 'switch' is MixLoRA-switch).")
        check_positive_ints(self, "r", "num_experts", "top_k")
        check_positive_ints(self, "expert_r", "expert_capacity", optional=True)
        check_positive(self, "expert_lora_alpha", finite=True)
        if self.top_k > self.num_experts:
            raise field_error(self, "top_k", f"={self.top_k} exceeds num_experts={self.num_experts}.")
        check_range(self, "top_p", 0, 1, low_open=True)
        check_positive(self, "capacity_factor", finite=True)
        check_non_negative(self, "router_init_range", "router_aux_loss_coef", "router_z_loss_coef", finite=True)
        check_range(self, "jitter_noise", 0, 1, high_open=True, note=" or None (the routing strategy's default)")
        for name, value in (SWITCH_DEFAULTS if self.routing_strategy == "switch" else OTHER_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def attention_lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)


def routing_policy(config: MixLoraConfig) -> Callable:
    if config.routing_strategy == "switch":
        return CapacityTop1(config.expert_capacity, config.capacity_factor)
    if config.routing_strategy == "top_p":
        return renormalized
    return straight_through if config.top_k == 1 else unchanged


class SharedLora(LoraLinear):
    """The one plain LoRA shared by all tokens on the attention projections. Not mergeable on its own: merging
    only these layers would leave a MixLoRA/MoLE adapter half merged."""

    mergeable = False


def build_mixlora(base_layer: nn.Module, info: LayerInfo, config: MixLoraConfig, path: str = ""):
    if info.kind != "ffn":
        return SharedLora(info, config.attention_lora())
    strategy = "dense" if config.routing_strategy == "switch" else config.routing_strategy  # switch: CapacityTop1
    router = Router(info.in_features, config.num_experts, strategy=strategy, init_std=config.router_init_range,
                    jitter=config.jitter_noise, top_k=config.top_k, top_p=config.top_p)
    return MixLoraFFN(base_layer, info, num_experts=config.num_experts, r=config.expert_r or config.r,
                      lora_alpha=config.expert_lora_alpha or config.lora_alpha, lora_dropout=config.lora_dropout,
                      router=router, policy=routing_policy(config))


def mixlora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    balance = argmax_balance_loss if config.routing_strategy == "switch" else load_balance_loss
    return router_loss(model, name, balance, config.router_aux_loss_coef, z_coef=config.router_z_loss_coef)


register_method(
    "mixlora", config=MixLoraConfig, build=build_mixlora, layer_kinds=("linear", "ffn"), extra_loss=mixlora_extra_loss,
    mergeable=False,
    description="Sparse mixture of LoRA experts over each frozen FFN (top-k / top-p / switch), shared attention LoRA.",
    paper="Li et al. 2024, arXiv:2404.15159",
    variants={"mixlora": {"num_experts": 4, "top_k": 2, "r": 4},
              "mixlora_dynamic": {"num_experts": 4, "r": 4, "routing_strategy": "top_p"},
              "mixlora_switch": {"num_experts": 4, "r": 4, "routing_strategy": "switch"}},
)
