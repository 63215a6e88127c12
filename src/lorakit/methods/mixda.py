"""MixDA — "Mixture-of-Domain-Adapters: Decoupling and Injecting Domain Knowledge to Pre-trained Language Models'
Memories", Diao et al., ACL 2023, arXiv:2306.05406.

K domain adapters run parallel to the FFN output projection (Llama: ``down_proj``, whose input x is the FFN's
intermediate activation); a sequence-level gate on x at the last real token weighs them and the FFN output:

    a_k(x) = U_k GELU(D_k x + d_k) + u_k       D_k: inter → inter/16 (Kaiming, d_k = 0), U_k, u_k = 0
    g = softmax(MoeGating(x_last)) ∈ Δ^{K+1}   (entry K+1 weighs the FFN output: the "+1")
    y = Σ_k g_k · a_k(x) + g_{K+1} · FFN(x)    (FFN(x) = W x + b, the frozen projection)

Follows the official code, tianyang-x/Mixture-of-Domain-Adapters:

- ``src/models/mixda_adapter.py`` ``MixtureOfDomainAdapter``: Linear → GELU → Linear, Kaiming-uniform down
  projection, zero up projection and biases, inter/16;
- ``src/models/transformers/modeling_roberta.py`` ``MoeGating``: Dropout(0.2) → Linear(inter, H) → [ReLU,
  Dropout, Linear(H, H)] × 2 → ReLU, Dropout, Linear(H, K+1) → softmax, on the last position; ``RobertaOutput``:
  the output ``stack([a_1(x)…, a_K(x), FFN(x)]) @ g`` — the gate can down-weight the FFN, so a fresh adapter
  (a_k = 0) scales the FFN output by g_{K+1} and does not equal the base model;
- ``src/models/mixda_stage_one.py``: stage 1 (knowledge) trains the domain adapters AND the gate, with loss
  ``0.5 · knowledge loss + MSE(mixed layer output, original FFN output)`` on general (old-domain) data, the MSE
  averaged over tokens, features and adapted layers. Stage 2 (task) trains the gate and a task adapter with
  the domain adapters frozen.

Choices:
- the MSE term: ``general_mse_coef`` × mean over the real tokens of general rows (routing key mapped to no
  domain) and features of (y − FFN(x))², averaged over adapted layers, added through ``extra_loss`` to the
  loop's loss, which is the knowledge loss: 2.0 = 1 / 0.5 keeps the official ratio. The official compares the
  layer outputs after RoBERTa's post-LayerNorm of the residual sum; in a pre-norm host (Llama) the residual
  stream differs by y − FFN(x) itself, which is what we compare. Padding is left out (the official averages
  every position).
- several domains train in one knowledge-stage run (the official trains one adapter per stage-1 run, where
  the gate is over [a_1, FFN]): a row whose key names domain k (``key_to_domain``, resolved like
  ``routed_lora``'s keys) is gated over [a_k, FFN] only; general rows and rows without a key over all K + 1.
  With one domain this is exactly the official stage 1.
- the gate's hidden size H is 768 in the official code (RoBERTa-large, intermediate 4096); the default here is
  min(768, in/4) so small models get a proportionate gate. The gate input is x at the last REAL token (the
  routing context's ``token_mask``; without one, the last position as in the official code, which is padding
  for right-padded rows). With a KV cache each step's gate sees only the new token.
- stages (``stage``): what a stage freezes is named by the delta's ``frozen_names`` (saved, never trained):
  knowledge = task adapter frozen; task = domain adapters frozen; the gate trains in both.
  ``set_mixda_stage(model, name, "task")`` switches in place (same state-dict keys), e.g. after loading a
  knowledge-stage adapter; build the optimizer after switching.
- task adapter (``task_adapter=True``; the official uses adapter-transformers' Houlsby/Pfeiffer adapters on the
  layer output): a Pfeiffer-style bottleneck on the mixed output, y + U_t GELU(D_t y) (hidden/16, U_t = 0).
- the official adapts RoBERTa-large layers 7 and 11 only: use ``layers_to_transform`` for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, check_dropout, check_non_negative, check_positive_ints, field_error
from ..core.delta import LayerInfo
from ..core.errors import AdapterError
from ..core.registry import register_method
from ..data import build_task_index
from ..mixtures.base import MixtureDelta, mixture_deltas, token_mask_for
from ..mixtures.experts import expand_to_ranks
from ..mixtures.keys import KeyTable, check_mapping, check_task_experts
from ..mixtures.router import RouterOutput

DOMAIN_TENSORS = ("down_weight", "down_bias", "up_weight", "up_bias")


@dataclass
class MixdaConfig(AdapterConfig):
    """``num_experts`` domain adapters, the experts the gate mixes with the FFN output (``n_domains`` in files
    written before the rename), or ``domains``: their names, which string keys use. ``key_to_domain``: task name ->
    domain index (-1: general data), resolved through the sorted names as the training loop's ids.

    - ``stage``: ``knowledge`` (domain adapters and gate train) or ``task`` (gate and task adapter train).
    - ``reduction``: bottleneck of each domain adapter = input width / reduction.
    - ``gate_hidden``: hidden width of the gate (None: min(768, input / 4)). ``gate_depth``: its Linear layers
      before the output. ``gate_dropout``: its dropout.
    - ``task_adapter``: add a task adapter on the mixed output; ``task_reduction``: its bottleneck divisor.
    - ``general_mse_coef``: weight of the stage-1 MSE to the FFN output on general rows.
    """

    renamed_fields = {"n_domains": "num_experts"}

    target_modules: list[str] | str | None = field(default_factory=lambda: ["down_proj"])
    num_experts: int | None = None
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
        if self.num_experts is None:
            if self.domains is None:
                raise field_error(self, "num_experts", " is unset: give num_experts (the number of domain adapters) or "
                                                       "domains (names).")
            self.num_experts = len(self.domains)
        check_positive_ints(self, "num_experts")
        if self.domains is not None and len(set(self.domains)) != self.num_experts:
            raise field_error(self, "num_experts", f"={self.num_experts} must match the distinct domains "
                                                   f"{self.domains}.")
        check_positive_ints(self, "reduction", "task_reduction", "gate_depth")
        check_positive_ints(self, "gate_hidden", optional=True)
        check_dropout(self, "gate_dropout")
        check_non_negative(self, "general_mse_coef")
        check_mapping("MixdaConfig", "key_to_domain", self.key_to_domain, self.num_experts)

    def check_examples(self, examples: Sequence[Any]) -> None:
        """A task key_to_domain lacks failed at the first batch; tasks spelled as ``domains`` in another order
        trained each other's adapters (``mixtures.keys.check_task_experts``). Tasks past the domains are general."""
        tasks = list(build_task_index(examples))  # the data's sorted task names: the loop's task ids index them
        check_task_experts(self, "key_to_domain", tasks, self.num_experts, self.domains, past_experts_ok=True)


class MixdaAdapter(MixtureDelta):
    """K bottleneck domain adapters beside one linear layer, a sequence-level gate and an optional task adapter."""

    def __init__(self, info: LayerInfo, config: MixdaConfig):
        k = config.num_experts
        super().__init__(info, k + 1)  # routing statistics over [domains…, FFN]: self.num_experts = K + 1
        b = max(1, info.in_features // config.reduction)
        self.num_domain_adapters, self.bottleneck = k, b
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
        """Knowledge stage: the task adapter is frozen; task stage: the domain adapters (the gate trains in both)."""
        if self.stage == "knowledge":
            return [n for n, _ in self.named_parameters() if n.startswith(("task_down.", "task_up."))]
        return list(DOMAIN_TENSORS)

    def __getstate__(self):
        state = super().__getstate__()
        state["_reg"] = []
        return state

    def gate_entries(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, K+1) bool: the entries each row's gate ranges over, and (batch,) bool: the general rows.
        Knowledge stage: a row of domain k → [a_k, FFN]; general rows → all. Task stage: all."""
        general = torch.ones(batch, dtype=torch.bool, device=device)
        own = torch.ones(batch, self.num_domain_adapters, dtype=torch.bool, device=device)
        if self.stage == "knowledge":
            domain = self.domain_of_key(batch, device) > 0  # (batch, K): one-hot, zeros for general rows
            general = ~domain.any(-1)
            own = domain | general[:, None]
        return torch.cat([own, own.new_ones(batch, 1)], dim=-1), general

    def gate_weights(self, x: torch.Tensor, entries: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, K+1) gate on x at each row's last real token, over ``entries`` (all by default)."""
        batch, seq = x.shape[:2]
        mask = token_mask_for(batch * seq)
        if mask is not None:  # last position whose mask is set (rows without one: the last position)
            last = (seq - 1) - mask.view(batch, seq).flip(1).int().argmax(1)
        else:
            last = torch.full((batch,), seq - 1, device=x.device)
        logits = self.gate(x[torch.arange(batch, device=x.device), last.to(x.device)]).float()
        if entries is not None:
            logits = logits.masked_fill(~entries, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if x.dim() != 3:
            raise AdapterError(f"mixda gates whole sequences: expected input (batch, seq, features), got "
                               f"{tuple(x.shape)}")
        x = x.to(self.down_weight.dtype)
        entries, general = self.gate_entries(x.shape[0], x.device)
        g = self.gate_weights(x, entries)  # (batch, K+1)
        with torch.no_grad():
            probs = g[:, None, :].expand(*x.shape[:2], -1).reshape(-1, g.shape[-1])
            self.observe(RouterOutput(logits=probs.log(), probs=probs, weights=probs, selected=probs > 0), x.shape)
        g = g.to(x.dtype)
        w = g[:, :self.num_domain_adapters]  # (batch, K)
        h = F.gelu(F.linear(x, self.down_weight, self.down_bias))  # (batch, seq, K·b): every adapter's bottleneck
        rank_gate = expand_to_ranks(w, self.owner)[:, None, :]  # (batch, 1, K·b)
        adapters = F.linear(h * rank_gate, self.up_weight) + (w @ self.up_bias)[:, None, :]  # Σ_k g_k a_k(x)
        ffn = base_out.to(x.dtype)
        delta = adapters + (g[:, -1, None, None] - 1.0) * ffn  # y − FFN(x), y = Σ_k g_k a_k + g_{K+1} FFN
        if self.stage == "knowledge":
            self.record_general(delta, general, x.shape)
        if self.task_down is not None:
            delta = delta + self.task_up(F.gelu(self.task_down(ffn + delta)))
        return delta.to(base_out.dtype)

    def record_general(self, delta: torch.Tensor, general: torch.Tensor, x_shape: torch.Size) -> None:
        """Keep the mean of (y − FFN(x))² over the real tokens and features of general rows (for ``extra_loss``)."""
        if not (self.training and torch.is_grad_enabled() and self.mse_coef > 0) or not bool(general.any()):
            return
        batch, seq = x_shape[:2]
        sq = delta[general].pow(2).mean(-1)  # (G, seq)
        mask = token_mask_for(batch * seq)
        real = mask.view(batch, seq)[general].to(sq.dtype) if mask is not None else torch.ones_like(sq)
        self._reg.append((sq * real).sum() / real.sum().clamp_min(1.0))

    def pop_reg(self) -> list[torch.Tensor]:
        terms, self._reg = self._reg, []
        return terms


def build_mixda(base_layer: nn.Module, info: LayerInfo, config: MixdaConfig, path: str = "") -> MixdaAdapter:
    return MixdaAdapter(info, config)


def mixda_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """Knowledge stage: ``general_mse_coef`` × mean (y − FFN(x))² on general rows (0 when there are none)."""
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
    example_routing=mixda_example_routing, mergeable=False, zero_init=False,
    description="MixDA: domain adapters beside the FFN output, a sequence gate over [domains…, FFN]; two stages.",
    paper="Diao et al. 2023 (ACL), arXiv:2306.05406",
    variants={"mixda": {"num_experts": 2, "reduction": 4},
              "mixda_task": {"num_experts": 2, "reduction": 4, "stage": "task", "task_adapter": True,
                             "task_reduction": 4, "gate_hidden": 8}},
)
