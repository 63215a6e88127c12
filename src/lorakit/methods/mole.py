"""LLaVA-MoLE — "LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction
Finetuning MLLMs", Chen et al., arXiv:2401.16160.

Every MLP becomes a top-1 mixture of E LoRA experts over the frozen MLP (each expert: LoRA on gate/up/down),
routed by ``softmax(W_g x + b)`` (a Linear WITH bias) on the MLP input; the attention projections get one
plain shared LoRA:

    y = FFN_{e*}(x),  e* = argmax_e p_e(x)        (dense=True:  y = Σ_e p_e(x) · FFN_e(x))

Balance loss ``Σ_e mean(p_e) · mean(onehot_e)`` (no ×E factor) over the real tokens of all layers.
The expert machinery is MixLoRA's (``mixlora.MixLoraFFN``: shared frozen projections, segment matmuls).

Choices (the released code, forwchen/LLaVA-MoLE, is inference only):

- sparse path: the released code applies no gate weight, so the router could learn only from the balance
  loss. We use the straight-through weight ``1 + p − sg(p)`` — value 1 as released (so a fresh adapter equals
  the base model), gradient of the top-1 probability, so the task loss trains the router too.
- ``router_aux_loss_coef`` (``moe_balance_w``) is not in the released code; we use 0.01. The released loss is
  computed per sample and averaged over the batch; we pool all tokens of the batch (equal for equal lengths).
- E=3 as released; r=16, α=32 follow the checkpoint's name ``r16_a32_e3`` (its inference args say r=32,
  α=64 — inconsistent). Router init N(0, 0.02), bias 0 (the release does not show the init).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..mixtures.base import router_loss
from ..mixtures.router import Router, mole_balance_loss
from .lora import LoraConfig
from .mixlora import DEFAULT_TARGETS, MixLoraFFN, SharedLora, straight_through, unchanged


@dataclass
class MoleConfig(AdapterConfig):
    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    num_experts: int = 3
    dense: bool = False
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0 or self.num_experts <= 0:
            raise ConfigError(f"MoleConfig: r and num_experts must be positive (got r={self.r}, "
                              f"num_experts={self.num_experts}).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"MoleConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")


def build_mole(base_layer: nn.Module, info: LayerInfo, config: MoleConfig, path: str = ""):
    if info.kind != "ffn":
        return SharedLora(info, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
    router = Router(info.in_features, config.num_experts, strategy="dense" if config.dense else "topk", bias=True,
                    top_k=1)
    return MixLoraFFN(base_layer, info, n_experts=config.num_experts, r=config.r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, router=router,
                      policy=unchanged if config.dense else straight_through)


def mole_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    return router_loss(model, name, mole_balance_loss, config.router_aux_loss_coef)


register_method(
    "mole", config=MoleConfig, build=build_mole, layer_kinds=("linear", "ffn"), extra_loss=mole_extra_loss,
    mergeable=False,
    description="LLaVA-MoLE: top-1 (or dense) mixture of LoRA experts on each MLP, shared attention LoRA.",
    paper="Chen et al. 2024, arXiv:2401.16160",
    variants={"mole": {"r": 4}, "mole_dense": {"r": 4, "dense": True}},
)
