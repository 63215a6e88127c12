"""LoRA experts routed by information carried with the data, no learned router: by a per-row key, by a per-token
modality, or mixed per user by a gate on a user vector.

- ``routed_lora`` — Phi-4-Mini / Phi-4-Multimodal "mixture of LoRAs" (Microsoft, arXiv:2503.01743): input-mode
  hard selection, ``y = W x + Σ_e w_e(key) · s_e · B_e A_e dropout(x)`` with ``w(key)`` one-hot (or a fixed
  weight vector) looked up from the row's routing key (``lorakit.routing(keys=...)``: task id or name); a key
  mapped to no expert gives the base model (Phi-4's text-only mode keeps the frozen LM unchanged).
- ``mm_lora`` — Arcana's MM-LoRA ("Arcana: Improving Multi-modal Large Language Model through Boosting Vision
  Capabilities"; no code found) / Phi-4-Multimodal's modality LoRAs: parallel LoRAs selected per TOKEN by a
  modality map ``F ⊙ (M == m)``, ``y_t = W x_t + s_{m_t} B_{m_t} A_{m_t} dropout(x_t)``; the map comes from
  ``routing(extras={"modality": (batch, seq) ints})`` (or ``token_mask`` with ``modality_source="token_mask"``).
  Arcana's rank split between the vision and language LoRAs is ``expert_r`` (e.g. ``[8, 24]``).
- ``reclora`` — RecLoRA, "Lifelong Personalized Low-Rank Adaptation of Large Language Models for
  Recommendation", Zhu et al., arXiv:2408.03533: a bank of N_m meta-LoRAs mixed per user in weight space,
  ``α = softmax(MLP(LN(u)) / T)`` (optionally √α), ``A_u = Σ_k α_k A_k``, ``B_u = Σ_k α_k B_k``,
  ``y = W x + (α_lora/r) · B_u A_u dropout(x)``, so ``ΔW_u ≠ Σ_k α_k ΔW_k`` (bilinear in α), as the official
  code (Gebro13/RecLoRA ``Loreclayer``). The user vector is ``routing(extras={"user_state": (batch, d_user)})``.

The first two stack their experts as rank blocks of one bank (``A`` (R, in), ``B`` (out, R), an ``owner`` map,
per-rank scaling; heterogeneous ranks, alphas, rsLoRA), so a forward is two GEMMs with a per-row or per-token
rank gate (``mixtures.experts.rank_block_delta``); RecLoRA forms each row's A_u, B_u with one einsum and runs
two ``bmm``. No Python loop over experts anywhere. Experts may be existing LoRA folders (lorakit or PEFT,
``adapter_paths``) or fresh (A Kaiming, B zero: a fresh adapter equals the base model).

RecLoRA choices: the gate is per adapted layer (as ``Loreclayer``), Kaiming weights and zero biases. The
official code means to Kaiming-initialise each meta-LoRA's A_k with fan-in = in, but it initialises a reshaped
copy of a weight column (a no-op), so its A keeps ``nn.Linear``'s default over (in·r, N_m); we follow the intent.
Only the default gate (``which_in_gate`` unset) and soft routing are implemented: the token-level and
attention-over-LoRA gates are ablations, and the "hard" top-k mode indexes with ``~indices`` (a bug).
Defaults as the official scripts: targets q, v; N_m = 8, r = 8, α = 16, gate hidden 60, T = 1 (dropout 0.05: ours).

Keys: integer key ``j`` is the j-th name of ``sorted(key_to_expert)`` (the training loop's task ids are positions
in the sorted task names, ``lorakit.data.build_task_index``), so ``key_to_expert`` must name every task of the
training data (an id past its names is an error); a string key is looked up by name; a negative key or None
means "no key" (``default_expert``, the base model by default). Without ``key_to_expert``, key j is expert j
(ids past the experts have none) and string keys are ``adapter_names``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ..core.config import AdapterConfig, field_list
from ..core.delta import LayerInfo
from ..core.errors import AdapterError, AdapterLoadError, ConfigError
from ..core.registry import register_method
from ..core.routing import current_routing
from ..mixtures.base import MixtureDelta
from ..mixtures.experts import expand_to_ranks, rank_block_delta
from ..mixtures.router import RouterOutput
from ..mixtures.sources import prepare_from_sources, read_lora_source


# -- a bank of LoRA experts as rank blocks (shared with X-LoRA) ---------------------------------------------
@dataclass
class LoraBankConfig(AdapterConfig):
    """N LoRA experts: ``adapter_paths`` (existing LoRA folders; ranks, alphas, targets read from them) or
    ``n_adapters`` / ``expert_r`` (fresh experts, B = 0; default r = 8, α = 2r). ``adapter_names`` label the slots
    (default: the folders' names).

    - ``expert_alpha``: each expert's LoRA alpha (read from the folders with ``adapter_paths``; default 2r).
    - ``expert_use_rslora``: per expert, scale by alpha/√r instead of alpha/r (read from the folders).
    - ``lora_dropout``: dropout on the bank's input, one mask for all experts, in [0, 1).
    """

    adapter_paths: list[str] | None = None
    adapter_names: list[str] | None = None
    n_adapters: int | None = None
    expert_r: list[int] = field_list()
    expert_alpha: list[float] = field_list()
    expert_use_rslora: list[bool] = field_list()
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if self.adapter_paths is not None:
            if not self.adapter_paths:
                raise ConfigError(f"{cls}.adapter_paths is empty; give LoRA adapter folders or None.")
            if self.n_adapters is not None and self.n_adapters != len(self.adapter_paths):
                raise ConfigError(f"{cls}.n_adapters={self.n_adapters} but {len(self.adapter_paths)} adapter_paths "
                                  "were given; leave n_adapters unset.")
            self.n_adapters = len(self.adapter_paths)
        elif self.n_adapters is None:
            if not self.expert_r:
                raise ConfigError(f"{cls} needs adapter_paths (existing LoRA adapters), n_adapters or expert_r.")
            self.n_adapters = len(self.expert_r)
        n = self.n_adapters
        if n <= 0:
            raise ConfigError(f"{cls}.n_adapters must be positive, got {n}.")
        if self.adapter_paths is None:  # fresh experts: explicit defaults, so the saved config is complete
            self.expert_r = self.expert_r or [8] * n
            self.expert_alpha = self.expert_alpha or [2.0 * r for r in self.expert_r]
            self.expert_use_rslora = self.expert_use_rslora or [False] * n
        for name in ("expert_r", "expert_alpha", "expert_use_rslora", "adapter_names"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise ConfigError(f"{cls}.{name} has {len(value)} entries for {n} adapters.")
        if any(r <= 0 for r in self.expert_r):
            raise ConfigError(f"{cls}.expert_r must be positive ranks, got {self.expert_r}.")
        if self.adapter_names is not None and len(set(self.adapter_names)) != n:
            raise ConfigError(f"{cls}.adapter_names must be {n} distinct names, got {self.adapter_names}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{cls}.lora_dropout must be in [0, 1), got {self.lora_dropout}.")


def bank_file_fields(config: LoraBankConfig, layers: list[LayerInfo]) -> dict[str, Any]:
    # The banks are in the saved file: loading it must not need (or re-read) the source adapters.
    return {"adapter_paths": None}


class LoraBank(MixtureDelta):
    """N LoRA experts stacked as rank blocks: ``A`` (R_total, in), ``B`` (out, R_total). A frozen bank
    (``trainable=False``) names both in ``frozen_names``: saved with the adapter, never trained."""

    def __init__(self, info: LayerInfo, config: LoraBankConfig, trainable: bool):
        super().__init__(info, config.n_adapters)
        ranks = list(config.expert_r)
        A = torch.empty(sum(ranks), info.in_features)  # (R_total, in)
        for start, r in zip(torch.tensor([0] + ranks).cumsum(0).tolist(), ranks):
            nn.init.kaiming_uniform_(A[start:start + r], a=math.sqrt(5))  # each block as its own nn.Linear would
        B = torch.zeros(info.out_features, sum(ranks))  # (out, R_total)
        self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
        self.bank_frozen = not trainable
        owner = torch.arange(len(ranks)).repeat_interleave(torch.tensor(ranks))  # (R_total,)
        scaling = torch.tensor([a / (math.sqrt(r) if rs else r) for r, a, rs in
                                zip(ranks, config.expert_alpha, config.expert_use_rslora)])
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("rank_scaling", scaling[owner], persistent=False)  # (R_total,)
        self.ranks = ranks
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def frozen_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if self.bank_frozen else ()

    @torch.no_grad()
    def set_adapter_block(self, index: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy expert ``index``'s factors, A (r, in) and B (out, r), into the bank."""
        start, r = sum(self.ranks[:index]), self.ranks[index]
        want_a, want_b = (r, self.info.in_features), (self.info.out_features, r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise AdapterLoadError(f"adapter {index}: LoRA factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do "
                                   f"not fit this layer and rank (expected {want_a}, {want_b}); is it for another "
                                   "base model, or does it use a per-module rank?")
        self.lora_A[start:start + r] = A.to(self.lora_A.dtype)
        self.lora_B[:, start:start + r] = B.to(self.lora_B.dtype)

    def load_sources(self, config: LoraBankConfig, path: str) -> "LoraBank":
        for i, directory in enumerate(config.adapter_paths or []):
            factors = read_lora_source(directory).factors(path)
            if factors is not None:  # else the block stays a fresh LoRA (A Kaiming, B zero): no effect
                self.set_adapter_block(i, *factors)
        return self

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, extra_scale: float = 1.0) -> torch.Tensor:
        """``Σ_e w_e s_e B_e A_e dropout(x)`` for x (..., in) and expert weights broadcastable to (..., E)."""
        x = x.to(self.lora_A.dtype)
        gate = expand_to_ranks(weights.to(x.dtype), self.owner, self.rank_scaling.to(x.dtype) * extra_scale)
        return rank_block_delta(self.lora_dropout(x), self.lora_A, self.lora_B, gate)

    def record(self, weights: torch.Tensor, x_shape: torch.Size, logits: torch.Tensor | None = None) -> None:
        """Routing statistics and traces only (``record_routing``); these methods have no auxiliary loss."""
        with torch.no_grad():
            w = weights.expand(*x_shape[:-1], weights.shape[-1]).reshape(-1, weights.shape[-1]).float()
            lg = w if logits is None else logits.reshape(-1, logits.shape[-1]).float()
            probs = w if logits is None else torch.softmax(lg, -1)
            self.observe(RouterOutput(logits=lg, probs=probs, weights=w, selected=w != 0), x_shape)


# -- routing keys -> expert weights ---------------------------------------------------------------------------
class KeyTable(nn.Module):
    """The routing context's per-row keys -> expert weights (batch, E). ``table`` (K+1, E): row j = key j's
    weights, the last row those of rows without a key. With a ``mapping`` the keys are its sorted names and an
    integer id past them is an error (the data has a task the mapping lacks); without one key j is expert j and
    ids past the experts have none."""

    def __init__(self, n_experts: int, mapping: Mapping[str, int | list[float]] | None, default: int,
                 names: Sequence[str] | None):
        super().__init__()
        rows = torch.eye(n_experts)
        self.names = list(names) if names is not None else None
        if mapping is not None:
            self.names = sorted(mapping)
            rows = torch.zeros(len(self.names), n_experts)
            for j, name in enumerate(self.names):
                value = mapping[name]
                if isinstance(value, int):
                    rows[j, value] = float(value >= 0)
                else:
                    rows[j] = torch.tensor(value, dtype=torch.float32)
        none = torch.zeros(1, n_experts)
        none[0, max(default, 0)] = float(default >= 0)
        self.register_buffer("table", torch.cat([rows, none]), persistent=False)
        self.strict = mapping is not None

    def forward(self, batch: int, device) -> torch.Tensor:
        ctx = current_routing()
        keys, n_keys = (None if ctx is None else ctx.keys), self.table.shape[0] - 1
        if keys is None:
            return self.table[n_keys].expand(batch, -1)
        if isinstance(keys, torch.Tensor):
            ids = keys.reshape(-1).to(device=device, dtype=torch.long)
        else:
            ids = torch.tensor([-1 if k is None else self._index(k) for k in keys], dtype=torch.long, device=device)
        if ids.numel() != batch:
            raise AdapterError(f"routing keys: {ids.numel()} keys for a batch of {batch} rows (give one key per row).")
        if self.strict and bool((ids >= n_keys).any()):
            raise AdapterError(f"routing key id {int(ids.max())} is out of range: ids index the {n_keys} sorted key "
                               f"names {self.names} (the training data's sorted task names); name every task.")
        return self.table[torch.where((ids < 0) | (ids >= n_keys), torch.full_like(ids, n_keys), ids)]

    def _index(self, key: Any) -> int:
        if not isinstance(key, str):
            return int(key)
        if self.names is None or key not in self.names:
            raise AdapterError(f"routing key {key!r} names no expert; known keys: {self.names or 'none (use ints)'}")
        return self.names.index(key)


def _check_mapping(cls: str, field_name: str, mapping: Mapping[str, Any] | None, n: int) -> None:
    for key, value in (mapping or {}).items():
        ok = (-1 <= value < n) if isinstance(value, int) else len(value) == n
        if not ok:
            raise ConfigError(f"{cls}.{field_name}[{key!r}]={value!r}: use an expert index in 0..{n - 1}, -1 for "
                              f"no expert, or a list of {n} weights.")


# -- routed_lora: hard (or fixed-weight) selection by a per-row key -----------------------------------------
@dataclass
class RoutedLoraConfig(LoraBankConfig):
    """``key_to_expert``: key name -> expert index (-1: base model) or a list of per-expert weights.
    ``default_expert``: the expert of rows without a key (-1: base). ``train_adapters``: train the experts (False
    freezes the bank)."""

    key_to_expert: dict[str, int | list[float]] | None = None
    default_expert: int = -1
    train_adapters: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_mapping(type(self).__name__, "key_to_expert", self.key_to_expert, self.n_adapters)
        if not -1 <= self.default_expert < self.n_adapters:
            raise ConfigError(f"RoutedLoraConfig.default_expert must be -1 (base) or in 0..{self.n_adapters - 1}.")


class RoutedLoraLinear(LoraBank):
    def __init__(self, info: LayerInfo, config: RoutedLoraConfig):
        super().__init__(info, config, trainable=config.train_adapters)
        self.keys = KeyTable(config.n_adapters, config.key_to_expert, config.default_expert, config.adapter_names)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if x.dim() != 3:
            raise AdapterError(f"routed_lora routes rows: expected input (batch, seq, features), got {tuple(x.shape)}")
        weights = self.keys(x.shape[0], x.device)[:, None, :]  # (batch, 1, E): one expert mix per row
        self.record(weights, x.shape)
        return self.mixed(x, weights).to(base_out.dtype)


def build_routed(base_layer: nn.Module, info: LayerInfo, config: RoutedLoraConfig, path: str = "") -> RoutedLoraLinear:
    return RoutedLoraLinear(info, config).load_sources(config, path)


def routed_example_routing(input_ids: torch.Tensor) -> dict[str, Any]:
    keys = torch.arange(input_ids.shape[0], device=input_ids.device) % 2
    keys[-1] = -1  # the last row has no key: base model
    return {"keys": keys}


register_method(
    "routed_lora", config=RoutedLoraConfig, build=build_routed, prepare=prepare_from_sources, file_fields=bank_file_fields,
    example_routing=routed_example_routing, mergeable=False,
    description="LoRA experts selected per row by a key carried with the data (task id / input mode); no router.",
    paper="Phi-4-Mini mixture of LoRAs, Microsoft 2025, arXiv:2503.01743",
    variants={"routed_lora": {"expert_r": [4, 2, 4], "expert_alpha": [8, 4, 16],
                              "expert_use_rslora": [False, False, True]},
              "routed_lora_default": {"expert_r": [2, 2], "default_expert": 0, "lora_dropout": 0.1}},
)


# -- mm_lora: per-token modality selection -------------------------------------------------------------------
@dataclass
class MMLoraConfig(LoraBankConfig):
    """One LoRA per modality (``expert_r`` = per-modality ranks). ``modality_to_expert``: entry m is the expert of
    modality id m (-1: none; default: modality m uses expert m). Tokens with a negative modality use no LoRA.
    Without a modality map every token has ``default_modality`` (text-only data; None: a map is required).
    ``modality_source``: where the map comes from, ``extras`` (``routing(extras={modality_key: ...})``) or
    ``token_mask``. ``modality_key``: its name in the routing extras. ``train_adapters``: train the LoRAs (False
    freezes them)."""

    modality_to_expert: list[int] | None = None
    default_modality: int | None = 0
    modality_source: Literal["extras", "token_mask"] = "extras"
    modality_key: str = "modality"
    train_adapters: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for m, e in enumerate(self.modality_to_expert or []):
            if not -1 <= e < self.n_adapters:
                raise ConfigError(f"MMLoraConfig.modality_to_expert[{m}]={e}: use -1 or 0..{self.n_adapters - 1}.")


class MMLoraLinear(LoraBank):
    def __init__(self, info: LayerInfo, config: MMLoraConfig):
        super().__init__(info, config, trainable=config.train_adapters)
        table = config.modality_to_expert if config.modality_to_expert is not None else list(range(config.n_adapters))
        onehot = torch.zeros(len(table) + 1, config.n_adapters)  # last row: "no LoRA"
        for m, e in enumerate(table):
            if e >= 0:
                onehot[m, e] = 1.0
        self.register_buffer("modality_weights", onehot, persistent=False)
        self.source, self.key, self.default = config.modality_source, config.modality_key, config.default_modality

    def modalities(self, x_shape: torch.Size, device) -> torch.Tensor:
        ctx = current_routing()
        m = None if ctx is None else (ctx.extras.get(self.key) if self.source == "extras" else ctx.token_mask)
        where = f"routing(extras={{{self.key!r}: ...}})" if self.source == "extras" else "routing(token_mask=...)"
        if m is None and self.default is not None:
            m = torch.full(tuple(x_shape[:-1]), self.default, device=device)
        if m is None:
            raise AdapterError(f"mm_lora needs a per-token modality map: run the forward inside {where} with a "
                               f"(batch, seq) integer tensor (a negative id means no LoRA).")
        m = torch.as_tensor(m, device=device).long()
        if tuple(m.shape) != tuple(x_shape[:-1]):
            raise AdapterError(f"mm_lora: modality map of shape {tuple(m.shape)} does not match the input tokens "
                               f"{tuple(x_shape[:-1])} (with a KV cache only the new tokens are fed; pass their map).")
        n = self.modality_weights.shape[0] - 1
        if bool((m >= n).any()):
            raise AdapterError(f"mm_lora: modality id {int(m.max())} has no entry (ids 0..{n - 1}, negative = none).")
        return torch.where(m < 0, torch.full_like(m, n), m)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weights = self.modality_weights[self.modalities(x.shape, x.device)]  # (..., E): one-hot per token
        self.record(weights, x.shape)
        return self.mixed(x, weights).to(base_out.dtype)


def build_mm(base_layer: nn.Module, info: LayerInfo, config: MMLoraConfig, path: str = "") -> MMLoraLinear:
    return MMLoraLinear(info, config).load_sources(config, path)


def mm_example_routing(input_ids: torch.Tensor) -> dict[str, Any]:
    b, t = input_ids.shape
    grid = torch.arange(t, device=input_ids.device)[None, :] + torch.arange(b, device=input_ids.device)[:, None]
    return {"extras": {"modality": grid % 3 - 1}}  # -1 (no LoRA), 0 (text), 1 (vision) interleaved


register_method(
    "mm_lora", config=MMLoraConfig, build=build_mm, prepare=prepare_from_sources, file_fields=bank_file_fields,
    example_routing=mm_example_routing, mergeable=False,
    description="Modality-parallel LoRAs (Arcana MM-LoRA / Phi-4-MM): each token uses its modality's LoRA.",
    paper="Arcana MM-LoRA (project page); Phi-4-Multimodal, arXiv:2503.01743",
    variants={"mm_lora": {"expert_r": [4, 2], "expert_alpha": [8, 8]}},
)


# -- reclora: per-user weight-space mixture of meta-LoRAs ----------------------------------------------------
@dataclass
class RecLoraConfig(AdapterConfig):
    """``user_dim``: size of the per-row user vector (the CRM's user representation); required.

    - ``n_meta``: meta-LoRAs in the bank (N_m).
    - ``r`` / ``lora_alpha``: each meta-LoRA's rank and alpha (scaling alpha / r).
    - ``lora_dropout``: dropout on the LoRA input, in [0, 1).
    - ``gate_hidden``: hidden width of the user gate MLP. ``gate_dropout``: its dropout.
    - ``temperature``: softmax temperature T of the gate. ``sqrt_after_softmax``: use √α instead of α.
    - ``user_key``: name of the user vector in ``routing(extras=...)``.
    """

    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    n_meta: int = 8
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    user_dim: int | None = None
    gate_hidden: int = 60
    gate_dropout: float = 0.1
    temperature: float = 1.0
    sqrt_after_softmax: bool = False
    user_key: str = "user_state"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.user_dim is None or self.user_dim <= 0:
            raise ConfigError("RecLoraConfig.user_dim must be set to the size of the user vector passed as "
                              "routing(extras={'user_state': (batch, user_dim)}).")
        if min(self.n_meta, self.r, self.gate_hidden) <= 0:
            raise ConfigError("RecLoraConfig: n_meta, r and gate_hidden must be positive.")
        if not self.temperature > 0:
            raise ConfigError(f"RecLoraConfig.temperature must be > 0, got {self.temperature}.")
        for name in ("lora_dropout", "gate_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"RecLoraConfig.{name} must be in [0, 1), got {getattr(self, name)}.")


class RecLoraLinear(MixtureDelta):
    """Meta-LoRA bank ``lora_A`` (N_m, r, in), ``lora_B`` (N_m, out, r) and this layer's user gate."""

    def __init__(self, info: LayerInfo, config: RecLoraConfig):
        super().__init__(info, config.n_meta)
        n, r = config.n_meta, config.r
        self.lora_A = nn.Parameter(torch.empty(n, r, info.in_features))
        for k in range(n):  # each meta-LoRA's A as nn.Linear(in, r) would be (see the module notes)
            nn.init.kaiming_uniform_(self.lora_A.data[k], a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n, info.out_features, r))
        self.gate = nn.Sequential(nn.LayerNorm(config.user_dim), nn.Linear(config.user_dim, config.gate_hidden),
                                  nn.ReLU(), nn.Dropout(config.gate_dropout), nn.Linear(config.gate_hidden, n))
        for i in (1, 4):  # official reset_lorec_parameters: Kaiming weights, zero biases
            nn.init.kaiming_uniform_(self.gate[i].weight, a=math.sqrt(5))
            nn.init.zeros_(self.gate[i].bias)
        self.scaling = config.lora_alpha / r
        self.temperature, self.sqrt = config.temperature, config.sqrt_after_softmax
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.user_key = config.user_key

    def user_weights(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, α), both (batch, N_m), from the routing context's user vectors."""
        ctx = current_routing()
        u = None if ctx is None else ctx.extras.get(self.user_key)
        if u is None:
            raise AdapterError(f"reclora needs a user vector per row: run the forward inside "
                               f"routing(extras={{{self.user_key!r}: tensor (batch, user_dim)}}).")
        u = torch.as_tensor(u).to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        if u.dim() != 2 or u.shape[0] != batch:
            raise AdapterError(f"reclora: user vectors of shape {tuple(u.shape)} for a batch of {batch} rows.")
        logits = self.gate(u)
        alpha = torch.softmax(logits / self.temperature, dim=-1)
        return logits, alpha.sqrt() if self.sqrt else alpha

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if x.dim() != 3:
            raise AdapterError(f"reclora mixes per row: expected input (batch, seq, features), got {tuple(x.shape)}")
        x = x.to(self.lora_A.dtype)
        logits, alpha = self.user_weights(x.shape[0])
        self.record_gate(logits, alpha, x.shape)
        A_u = torch.einsum("bk,kri->bri", alpha, self.lora_A)  # (batch, r, in): Σ_k α_k A_k
        B_u = torch.einsum("bk,kor->bor", alpha, self.lora_B)  # (batch, out, r): Σ_k α_k B_k
        h = torch.bmm(self.lora_dropout(x), A_u.transpose(1, 2))  # (batch, seq, r)
        return (torch.bmm(h, B_u.transpose(1, 2)) * self.scaling).to(base_out.dtype)  # (batch, seq, out)

    def record_gate(self, logits: torch.Tensor, alpha: torch.Tensor, x_shape: torch.Size) -> None:
        with torch.no_grad():
            n = alpha.shape[-1]
            lg = logits[:, None, :].expand(*x_shape[:-1], n).reshape(-1, n).float()
            w = alpha[:, None, :].expand(*x_shape[:-1], n).reshape(-1, n).float()
            self.observe(RouterOutput(logits=lg, probs=torch.softmax(lg, -1), weights=w, selected=w > 0), x_shape)


def build_reclora(base_layer: nn.Module, info: LayerInfo, config: RecLoraConfig, path: str = "") -> RecLoraLinear:
    return RecLoraLinear(info, config)


def reclora_example_routing(input_ids: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"extras": {"user_state": torch.randn(input_ids.shape[0], 8, generator=g).to(input_ids.device)}}


register_method(
    "reclora", config=RecLoraConfig, build=build_reclora, example_routing=reclora_example_routing, mergeable=False,
    description="RecLoRA: a bank of meta-LoRAs mixed in weight space per user by a gate on a user vector.",
    paper="Zhu et al. 2024, arXiv:2408.03533",
    variants={"reclora": {"n_meta": 3, "r": 4, "user_dim": 8},
              "reclora_sqrt": {"n_meta": 2, "r": 2, "user_dim": 8, "sqrt_after_softmax": True, "temperature": 2.0,
                               "lora_dropout": 0.0}},
)
