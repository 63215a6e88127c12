"""MixDA — "Mixture-of-Domain-Adapters: Decoupling and Injecting Domain Knowledge to Pre-trained Language Models'
Memories", Diao et al., ACL 2023, arXiv:2306.05406.

K domain adapters run parallel to the FFN output projection (Llama: ``down_proj``, whose input x is the FFN's
intermediate activation); a sequence-level gate on x at the last real token weighs them against the FFN output:

    a_k(x) = U_k GELU(D_k x + d_k) + u_k       D_k: inter → inter/16 (Kaiming, d_k = 0), U_k, u_k = 0
    g = softmax(MoeGating(x_last)) ∈ Δ^{K+1}   (entry K+1 weighs the plain FFN output: the "+1")
    knowledge stage:  y = W x + a_{k(row)}(x)                       (each domain adapter on its domain's rows)
    task stage:       y = Σ_k g_k (W x + a_k(x)) + g_{K+1} W x = W x + Σ_k g_k a_k(x)   [+ task adapter]

Follows the official code (tianyang-x/Mixture-of-Domain-Adapters: ``MixtureOfDomainAdapter``, ``MoeGating``,
``RobertaOutput``) for the adapter (Linear → GELU → Linear, zero-initialised up-projection, inter/16), the gate
(Dropout(0.2) → Linear(inter, H) → [ReLU, Dropout, Linear(H, H)] × 2 → ReLU, Dropout, Linear(H, K+1) → softmax)
and its input (the intermediate activation at the last position, one gate per sequence).

Choices and deviations:
- Experts are parametrised as the FFN output plus a zero-initialised bottleneck, E_k = W x + a_k(x); the
  official mixes bare bottlenecks, Σ_k g_k a_k(x) + g_{K+1} W x (and its stage 1 without gating replaces the FFN
  output by the adapter's). Ours keeps a fresh adapter exactly equal to the base model while the gate still
  splits a unit mass between the K experts and the FFN. The official stage-1 regulariser MSE(adapter output,
  FFN output) on old-domain data then reads ‖a_k(x)‖²: we take it at every adapted layer on the rows whose key
  maps to no domain ("general" rows), averaged over real tokens, features, the K adapters and the layers, and
  add ``general_mse_coef`` × it through ``extra_loss`` (official: 0.5·knowledge + 1·MSE, i.e. 2.0 relative to
  the knowledge loss). The paper states it on "logits"; the official code compares layer outputs, as we do.
- Several domains train in one knowledge-stage run: a row's routing key picks its domain adapter
  (``key_to_domain``, resolved like ``routed_lora``'s keys; the official trains one adapter per stage-1 run).
- The gate's hidden size H is 768 in the official code (RoBERTa-large, intermediate 4096); the default here is
  min(768, in/4) so small models get a proportionate gate. The gate input is x at the last REAL token (the
  routing context's ``token_mask``; without one, the last position as in the official code, which is padding
  for right-padded rows). With a KV cache each step's gate sees only the new token.
- Stages (``stage``): what a stage freezes is named by the delta's ``frozen_names`` (saved, never trained):
  knowledge = domain adapters trainable, gate and task adapter frozen; task = the reverse.
  ``set_mixda_stage(model, name, "task")`` switches in place (same state-dict keys), e.g. after loading a
  knowledge-stage adapter; build the optimizer after switching.
- Task adapter (``task_adapter=True``; the official uses adapter-transformers' Houlsby/Pfeiffer adapters on the
  layer output): a Pfeiffer-style bottleneck on the mixed output, y + U_t GELU(D_t y) (hidden/16, U_t = 0).
- The official adapts RoBERTa-large layers 7 and 11 only: use ``layers_to_transform`` for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo
from ..core.errors import AdapterError, ConfigError
from ..core.registry import register_method
from ..mixtures.base import MixtureDelta, mixture_deltas, token_mask_for
from ..mixtures.experts import expand_to_ranks
from ..mixtures.router import RouterOutput
from .routed import KeyTable, _check_mapping

DOMAIN_TENSORS = ("down_weight", "down_bias", "up_weight", "up_bias")


@dataclass
class MixdaConfig(AdapterConfig):
    """``n_domains`` domain adapters (or ``domains``: their names, which string keys use). ``key_to_domain``:
    task name -> domain index (-1: general data), resolved through the sorted names as the training loop's ids."""

    target_modules: list[str] | str | None = field(default_factory=lambda: ["down_proj"])
    n_domains: int | None = None
    domains: list[str] | None = None
    key_to_domain: dict[str, int] | None = None
    stage: Literal["knowledge", "task"] = "knowledge"
    reduction: int = 16
    gate_hidden: int | None = None
    gate_depth: int = 3
    gate_dropout: float = 0.2
    task_adapter: bool = False
    task_reduction: int = 16
    general_mse_coef: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_domains is None:
            if self.domains is None:
                raise ConfigError("MixdaConfig needs n_domains (the number of domain adapters) or domains (names).")
            self.n_domains = len(self.domains)
        if self.n_domains <= 0 or (self.domains is not None and len(set(self.domains)) != self.n_domains):
            raise ConfigError(f"MixdaConfig: n_domains={self.n_domains} must be positive and match {self.domains}.")
        if min(self.reduction, self.gate_depth, self.task_reduction) <= 0 or (self.gate_hidden or 1) <= 0:
            raise ConfigError("MixdaConfig: reduction, task_reduction, gate_depth and gate_hidden must be positive.")
        if not 0.0 <= self.gate_dropout < 1.0 or self.general_mse_coef < 0:
            raise ConfigError("MixdaConfig: gate_dropout must be in [0, 1) and general_mse_coef >= 0.")
        _check_mapping("MixdaConfig", "key_to_domain", self.key_to_domain, self.n_domains)


class MixdaAdapter(MixtureDelta):
    """K bottleneck domain adapters beside one linear layer, a sequence-level gate and an optional task adapter."""

    def __init__(self, info: LayerInfo, config: MixdaConfig):
        k = config.n_domains
        super().__init__(info, k + 1)  # routing statistics over [domains…, FFN]
        b = max(1, info.in_features // config.reduction)
        self.n_domains, self.bottleneck = k, b
        self.down_weight = nn.Parameter(torch.empty(k * b, info.in_features))  # (K·b, in)
        for i in range(k):  # each adapter's down-projection as its own nn.Linear + kaiming_uniform_(a=√5)
            nn.init.kaiming_uniform_(self.down_weight.data[i * b:(i + 1) * b], a=math.sqrt(5))
        self.down_bias = nn.Parameter(torch.zeros(k * b))
        self.up_weight = nn.Parameter(torch.zeros(info.out_features, k * b))  # (out, K·b)
        self.up_bias = nn.Parameter(torch.zeros(k, info.out_features))  # (K, out)
        self.register_buffer("owner", torch.arange(k).repeat_interleave(b), persistent=False)  # (K·b,)
        hidden = config.gate_hidden or max(1, min(768, info.in_features // 4))
        layers: list[nn.Module] = [nn.Dropout(config.gate_dropout), nn.Linear(info.in_features, hidden)]
        for _ in range(config.gate_depth - 1):
            layers += [nn.ReLU(), nn.Dropout(config.gate_dropout), nn.Linear(hidden, hidden)]
        self.gate = nn.Sequential(*layers, nn.ReLU(), nn.Dropout(config.gate_dropout), nn.Linear(hidden, k + 1))
        self.task_down = self.task_up = None
        if config.task_adapter:
            t = max(1, info.out_features // config.task_reduction)
            self.task_down, self.task_up = nn.Linear(info.out_features, t), nn.Linear(t, info.out_features)
            nn.init.zeros_(self.task_up.weight)
            nn.init.zeros_(self.task_up.bias)
        self.domain_of_key = KeyTable(k, config.key_to_domain, -1, config.domains)  # general data: all zeros
        self.mse_coef = config.general_mse_coef
        self._reg: list[torch.Tensor] = []
        self.set_stage(config.stage)

    def set_stage(self, stage: str) -> None:
        self.stage = stage  # what trains follows through frozen_names (the core re-reads it)

    def frozen_names(self) -> list[str]:
        """Knowledge stage: the gate and task adapter are frozen; task stage: the domain adapters."""
        if self.stage == "knowledge":
            return [n for n, _ in self.named_parameters() if n not in DOMAIN_TENSORS]
        return list(DOMAIN_TENSORS)

    def __getstate__(self):
        state = super().__getstate__()
        state["_reg"] = []
        return state

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K+1) gate on x at each row's last real token."""
        batch, seq = x.shape[:2]
        mask = token_mask_for(batch * seq)
        if mask is not None:  # last position whose mask is set (rows without one: the last position)
            last = (seq - 1) - mask.view(batch, seq).flip(1).int().argmax(1)
        else:
            last = torch.full((batch,), seq - 1, device=x.device)
        return torch.softmax(self.gate(x[torch.arange(batch, device=x.device), last.to(x.device)]).float(), dim=-1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if x.dim() != 3:
            raise AdapterError(f"mixda gates whole sequences: expected input (batch, seq, features), got "
                               f"{tuple(x.shape)}")
        x = x.to(self.down_weight.dtype)
        h = F.gelu(F.linear(x, self.down_weight, self.down_bias))  # (batch, seq, K·b): every adapter's bottleneck
        if self.stage == "knowledge":
            w = self.domain_of_key(x.shape[0], x.device)  # (batch, K): one-hot, zeros for general rows
            self.record_general(h, w, x.shape)
        else:
            g = self.gate_weights(x)
            with torch.no_grad():
                probs = g[:, None, :].expand(*x.shape[:2], -1).reshape(-1, g.shape[-1])
                self.observe(RouterOutput(logits=probs.log(), probs=probs, weights=probs, selected=probs > 0), x.shape)
            w = g[:, :self.n_domains].to(x.dtype)
        rank_gate = expand_to_ranks(w, self.owner)[:, None, :]  # (batch, 1, K·b)
        delta = F.linear(h * rank_gate, self.up_weight) + (w @ self.up_bias)[:, None, :]  # Σ_k w_k a_k(x)
        if self.task_down is not None:
            y = base_out.to(delta.dtype) + delta
            delta = delta + self.task_up(F.gelu(self.task_down(y)))
        return delta.to(base_out.dtype)

    def record_general(self, h: torch.Tensor, w: torch.Tensor, x_shape: torch.Size) -> None:
        """Keep mean ‖a_k(x)‖² over the real tokens of general rows, for every adapter k (for ``extra_loss``)."""
        if not (self.training and torch.is_grad_enabled() and self.mse_coef > 0):
            return
        general = w.sum(-1) == 0  # (batch,)
        if not bool(general.any()):
            return
        batch, seq = x_shape[:2]
        hg = h[general].view(-1, seq, self.n_domains, self.bottleneck)  # (G, seq, K, b)
        up = self.up_weight.view(-1, self.n_domains, self.bottleneck)  # (out, K, b)
        outs = torch.einsum("gtkb,okb->gtko", hg, up) + self.up_bias  # (G, seq, K, out): every a_k(x)
        sq = outs.pow(2).mean(dim=(-1, -2))  # (G, seq)
        mask = token_mask_for(batch * seq)
        real = mask.view(batch, seq)[general].to(sq.dtype) if mask is not None else torch.ones_like(sq)
        self._reg.append((sq * real).sum() / real.sum().clamp_min(1.0))

    def pop_reg(self) -> list[torch.Tensor]:
        terms, self._reg = self._reg, []
        return terms


def build_mixda(base_layer: nn.Module, info: LayerInfo, config: MixdaConfig, path: str = "") -> MixdaAdapter:
    return MixdaAdapter(info, config)


def mixda_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """Knowledge stage: ``general_mse_coef`` × mean ‖a_k(x)‖² on general rows (0 when there are none)."""
    from ..core.model import adapter_state

    terms = [t for _, _, d in mixture_deltas(model, name) if isinstance(d, MixdaAdapter) for t in d.pop_reg()]
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return adapter_state(model).configs[name].general_mse_coef * torch.stack(terms).mean()


def set_mixda_stage(model: nn.Module, name: str, stage: str) -> None:
    """Switch adapter ``name`` between the knowledge and task stages (what trains, what stays frozen)."""
    from ..core.model import adapter_layers, adapter_state, set_adapter

    state = adapter_state(model)
    config = state.configs.get(name)
    if not isinstance(config, MixdaConfig):
        raise AdapterError(f"adapter {name!r} is not a MixDA adapter (loaded: {list(state.configs)})")
    state.configs[name] = replace(config, stage=stage)
    for _, layer in adapter_layers(model):
        if name in layer.adapters:
            layer.adapters[name].set_stage(stage)
    if state.active:
        set_adapter(model, state.active)


def mixda_example_routing(input_ids: torch.Tensor) -> dict[str, Any]:
    keys = torch.arange(input_ids.shape[0], device=input_ids.device) % 2
    keys[-1] = -1  # a general-data row
    mask = torch.ones_like(input_ids)
    mask[0, -2:] = 0  # right padding on the first row: its gate reads an earlier position
    return {"keys": keys, "token_mask": mask}


register_method(
    "mixda", config=MixdaConfig, build=build_mixda, extra_loss=mixda_extra_loss,
    example_routing=mixda_example_routing, mergeable=False,
    description="MixDA: domain adapters beside the FFN output, a sequence gate over [domains…, FFN]; two stages.",
    paper="Diao et al. 2023 (ACL), arXiv:2306.05406",
    variants={"mixda": {"n_domains": 2, "reduction": 4},
              "mixda_task": {"n_domains": 2, "reduction": 4, "stage": "task", "task_adapter": True,
                             "task_reduction": 4, "gate_hidden": 8}},
)
