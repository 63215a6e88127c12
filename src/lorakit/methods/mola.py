"""MoLA — "Higher Layers Need More LoRA Experts", Gao et al., arXiv:2402.08562.

Every target linear gets its own router and E_l LoRA experts, where the expert count E_l depends on the
layer (groups of consecutive layers): ``y = W x + Σ_{e ∈ topk_l(x)} g_e(x) · (α/r) · B_e A_e dropout(x)``,
``g = renormalised top-k of softmax(W_g x)``. Allocations: ``"2-4-6-8"`` (MoLA-▽, more experts higher
up, the paper's best), ``"8-6-4-2"`` (△), ``"5-5-5-5"`` (□, uniform), or any list; the layers are split
evenly into as many groups as numbers given.

Follows the official code, GCYZSL/MoLA:

- ``src/mola_lora_hacked.py`` ``Linear_MoE``: router ``nn.Linear(in, E, bias=False)`` on the layer input,
  Kaiming-uniform initialised (a = √5, ``reset_lora_parameters_MoE``), float32 softmax, top-k renormalised
  (default 2), experts' A Kaiming-uniform and B zero, scaling α / r;
- ``src/mola_modeling_llama_hacked.py`` ``load_balancing_loss_func``: only when enabled (``--obalance``, here
  ``use_balance_loss``, off by default), one loss per decoder layer over the router logits of all that layer's
  adapted modules concatenated: ``E · Σ_e f_e · P̄_e`` with f_e the share of all top-k assignments that went to
  e (normalised by the total number of assignments, so uniform routing gives 1) and P̄_e the mean probability;
  summed over decoder layers and multiplied by ``router_aux_loss_coef`` = 0.001.

Our one choice: padding tokens are left out of the loss where the routing context gives a token mask (the
official counts every position). Experts are rank blocks of one wide LoRA, so the forward is two GEMMs
whatever the number of experts (see ``mixtures.experts.rank_block_delta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.config import AdapterConfig, check_non_negative, check_positive_ints, field_error
from ..core.delta import LayerInfo
from ..core.errors import FIELD, ConfigError
from ..core.registry import register_method
from ..core.targeting import layer_index
from ..mixtures.base import MixtureDelta, count_layers, router_loss
from ..mixtures.experts import expand_to_ranks, rank_block_delta
from ..mixtures.router import Router, assignment_balance_loss


NUM_EXPERTS = "MolaConfig.num_experts"  # the field parse_allocation's errors are about


def parse_allocation(spec: int | str | list[int]) -> list[int]:
    """Expert counts per group of layers from ``"2-4-6-8"``, ``[2, 4, 6, 8]`` or one int (every layer).
    Raises ConfigError for an empty or non-positive count."""
    if isinstance(spec, int):
        spec = [spec]
    try:
        counts = [int(c) for c in spec.replace(",", "-").split("-")] if isinstance(spec, str) else list(spec)
    except ValueError:
        raise ConfigError(f"{FIELD}={spec!r}: give positive expert counts like '2-4-6-8' (numbers joined by '-'), "
                          "one number, or a list.", field=NUM_EXPERTS) from None
    if not counts or any(c <= 0 for c in counts):
        raise ConfigError(f"{FIELD}={spec!r}: give positive expert counts like '2-4-6-8'.", field=NUM_EXPERTS)
    return counts


@dataclass
class MolaConfig(AdapterConfig):
    """MoLA's options (official defaults).

    - ``r`` / ``lora_alpha``: each expert's rank and alpha (scaling alpha / r). ``lora_dropout``: on the input.
    - ``num_experts``: experts per decoder layer: one number for every layer, or an allocation over equal groups of
      layers, e.g. "2-4-6-8" (four groups) or a list (``experts_per_layer`` in files written before the rename).
    - ``top_k``: experts each token uses.
    - ``use_balance_loss``: add the per-layer load-balancing loss, weighted by ``router_aux_loss_coef``.
    - ``num_layers``: decoder layers of the model (filled when the adapter is added).
    """

    renamed_fields = {"experts_per_layer": "num_experts"}

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    num_experts: int | str | list[int] = "2-4-6-8"
    top_k: int = 2
    use_balance_loss: bool = False
    router_aux_loss_coef: float = 0.001
    num_layers: int | None = None  # filled from the model when the adapter is added

    def __post_init__(self) -> None:
        super().__post_init__()
        counts = parse_allocation(self.num_experts)
        check_positive_ints(self, "r", "top_k")
        if self.top_k > min(counts):
            raise field_error(self, "top_k", f"={self.top_k} exceeds the smallest expert count {min(counts)} in "
                              f"num_experts={self.num_experts!r}.")
        check_non_negative(self, "router_aux_loss_coef", finite=True)

    def experts_at(self, layer: int | None) -> int:
        counts = parse_allocation(self.num_experts)
        if layer is None or not self.num_layers:
            return counts[0]
        group = min(layer * len(counts) // self.num_layers, len(counts) - 1)
        return counts[group]


class MolaLinear(MixtureDelta):
    """E LoRA experts of rank r on one linear layer, with a top-k router on the layer input."""

    def __init__(self, info: LayerInfo, config: MolaConfig, num_experts: int):
        super().__init__(info, num_experts)
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts * config.r, info.in_features))  # (E·r, in)
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, num_experts * config.r))  # (out, E·r)
        for e in range(num_experts):  # each expert's A as its own nn.Linear would be initialised
            nn.init.kaiming_uniform_(self.lora_A.data[e * config.r:(e + 1) * config.r], a=math.sqrt(5))
        self.router = Router(info.in_features, num_experts, strategy="topk", top_k=config.top_k)
        nn.init.kaiming_uniform_(self.router.gate.weight, a=math.sqrt(5))
        self.register_buffer("owner", torch.arange(num_experts).repeat_interleave(config.r), persistent=False)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        routed = self.router(x)
        self.observe(routed, x.shape)
        gate = expand_to_ranks(routed.weights.to(x.dtype), self.owner) * self.scaling  # (N, E·r)
        flat = self.lora_dropout(x).reshape(-1, x.shape[-1])
        return rank_block_delta(flat, self.lora_A, self.lora_B, gate).reshape(base_out.shape).to(base_out.dtype)


def build_mola(base_layer: nn.Module, info: LayerInfo, config: MolaConfig, path: str = "") -> MolaLinear:
    return MolaLinear(info, config, config.experts_at(layer_index(path + ".", config.layers_pattern)))


def prepare_mola(model: nn.Module, config: MolaConfig) -> MolaConfig:
    if config.num_layers:  # a loaded file's (or a user's) count: the allocation it was trained with stands
        return config
    num_layers = count_layers(model, config.layers_pattern)
    groups = len(parse_allocation(config.num_experts))
    if groups > num_layers:  # groups past the last layer would get no layer (their expert counts silently unused)
        raise field_error(config, "num_experts", f"={config.num_experts!r} allocates experts over {groups} groups of "
                                                 f"layers, but the model has {num_layers} decoder layers; give at "
                                                 f"most {num_layers} counts.")
    return replace(config, num_layers=num_layers)


def mola_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    coef = config.router_aux_loss_coef if config.use_balance_loss else 0.0
    return router_loss(model, name, assignment_balance_loss, coef,
                       group=lambda path: layer_index(path + ".", config.layers_pattern))


register_method(
    "mola", config=MolaConfig, build=build_mola, prepare=prepare_mola, extra_loss=mola_extra_loss, mergeable=False,
    description="Per-layer mixtures of LoRA experts, more experts in higher layers (2-4-6-8), top-k routers.",
    paper="Gao et al. 2024, arXiv:2402.08562",
    variants={"mola": {"num_experts": "2-4", "top_k": 2, "r": 4},
              "mola_inverted": {"num_experts": "4-2", "top_k": 1, "r": 4, "use_balance_loss": True}},
)
