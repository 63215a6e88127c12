"""LLaVA-MoLE — "LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction
Finetuning MLLMs", Chen et al., arXiv:2401.16160.

Every MLP gets E LoRA experts on its projections gate/up/down, routed by ``p = softmax(W_g x + b)`` (a Linear
WITH bias) on the MLP input; the attention projections get one plain shared LoRA:

    top-1 (default):  y = FFN_{e*}(x),  e* = argmax_e p_e(x)    (FFN_e: every projection W + s·B_e A_e)
    dense=True:       proj(z) = W z + Σ_e p_e(x) · s · B_e A_e z   for z = x (gate, up) and z = act(gate)·up (down)

The dense variant mixes the experts' LoRA deltas inside each projection, then applies the activation; it is
not a mixture of whole expert FFNs. Balance loss ``Σ_e mean(p_e) · mean(onehot_e(argmax p))`` (no ×E factor)
over the real tokens of all layers, for both variants.

Follows the official code, forwchen/LLaVA-MoLE ``moe.py`` ``LoRA_MOE_LM`` (``forward``, ``forward_lora_moe``
for dense, ``forward_lora_moe_sparse`` for top-1; router ``nn.Linear(d_model, E)`` with PyTorch's default
init, as here) and ``model.py`` (the balance loss, per sample over the attention mask). The expert machinery
is MixLoRA's (``mixtures.ffn_experts.MixLoraFFN``: shared frozen projections, segment matmuls); the dense path is
a rank block gate over the stacked experts (``mixtures.experts.rank_block_delta``), no loop over experts.

Choices (the released code is inference only):

- sparse path: the released code applies no gate weight, so the router could learn only from the balance
  loss. We use the straight-through weight ``1 + p − sg(p)`` — value 1 as released (so a fresh adapter equals
  the base model), gradient of the top-1 probability, so the task loss trains the router too.
- ``router_aux_loss_coef`` (``moe_balance_w``) has no released value; we use 0.01. The released loss is
  computed per sample and averaged over the batch; we pool all tokens of the batch (equal for equal lengths).
- dense path: one LoRA-dropout mask shared by the experts of a projection (the release draws one per expert).
- E=3 as released; r=16, α=32 follow the checkpoint's name ``r16_a32_e3`` (its inference args say r=32,
  α=64 — inconsistent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import AdapterConfig, check_non_negative, check_positive_ints
from ..core.delta import LayerInfo
from ..core.registry import register_method
from ..mixtures.base import router_loss
from ..mixtures.experts import expand_to_ranks, rank_block_delta
from ..mixtures.ffn_experts import MixLoraFFN
from ..mixtures.router import Router, RouterOutput, mole_balance_loss, straight_through, unchanged
from .lora import LoraConfig
from .mixlora import DEFAULT_TARGETS, SharedLora


@dataclass
class MoleConfig(AdapterConfig):
    """MoLE's options (official defaults).

    - ``r`` / ``lora_alpha``: each expert's rank and alpha (scaling alpha / r). ``lora_dropout``: on the input.
    - ``num_experts``: LoRA experts per MLP. ``dense``: mix all experts by the router's weights (False: top-1).
    - ``router_aux_loss_coef``: weight of the load-balancing loss added to the task loss.
    """

    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    num_experts: int = 3
    dense: bool = False
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r", "num_experts")
        check_non_negative(self, "router_aux_loss_coef", finite=True)


class MoleDenseFFN(MixLoraFFN):
    """Dense LLaVA-MoLE: every projection adds the probability-weighted sum of its E experts' LoRA deltas."""

    def __init__(self, base_layer: nn.Module, info: LayerInfo, **kwargs):
        super().__init__(base_layer, info, **kwargs)
        self.register_buffer("owner", torch.arange(self.num_experts).repeat_interleave(self.r), persistent=False)

    def _mixed(self, base_layer: nn.Module, name: str, z: torch.Tensor, rank_gate: torch.Tensor) -> torch.Tensor:
        """``W z + Σ_e p_e s B_e A_e dropout(z)`` for z (N, in)."""
        A, B = self.lora_A[name], self.lora_B[name]  # (E, r, in), (E, out, r)
        delta = rank_block_delta(self.lora_dropout(z.to(A.dtype)), A.reshape(-1, A.shape[-1]),  # A: (E·r, in)
                                 B.permute(1, 0, 2).reshape(B.shape[1], -1), rank_gate)  # B: (out, E·r)
        return getattr(base_layer, name)(z).to(A.dtype) + delta

    def full_forward(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        spec = self.spec
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        routed = self.router(x)  # top-1 selection: what the balance loss counts (onehot of the argmax)
        self.observe(RouterOutput(routed.logits, routed.probs, routed.probs, routed.selected), x.shape)
        rank_gate = expand_to_ranks(routed.probs.to(self.lora_A[spec.up].dtype), self.owner) * self.scaling
        up = self._mixed(base_layer, spec.up, flat, rank_gate)  # (N, I)
        act = getattr(base_layer, spec.act)
        h = act(self._mixed(base_layer, spec.gate, flat, rank_gate)) * up if spec.gate else act(up)
        out = self._mixed(base_layer, spec.down, h.to(x.dtype), rank_gate).to(x.dtype).view(*x.shape[:-1], -1)
        return getattr(base_layer, spec.dropout)(out) if spec.dropout else out


def build_mole(base_layer: nn.Module, info: LayerInfo, config: MoleConfig, path: str = ""):
    if info.kind != "ffn":
        return SharedLora(info, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
    router = Router(info.in_features, config.num_experts, strategy="topk", bias=True, top_k=1)
    router.gate.reset_parameters()  # the release's plain nn.Linear(d_model, E)
    expert_kwargs = dict(num_experts=config.num_experts, r=config.r, lora_alpha=config.lora_alpha,
                         lora_dropout=config.lora_dropout, router=router)
    if config.dense:
        return MoleDenseFFN(base_layer, info, policy=unchanged, **expert_kwargs)
    return MixLoraFFN(base_layer, info, policy=straight_through, **expert_kwargs)


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
