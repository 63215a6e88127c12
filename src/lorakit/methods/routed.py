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

The first two stack their experts as rank blocks of one LoRA (``mixtures.rank_blocks.LoraExperts``: ``A`` (R, in),
``B`` (out, R), an ``owner`` map, per-rank scaling; heterogeneous ranks, alphas, rsLoRA), so a forward is two GEMMs
with a per-row or per-token rank gate (``mixtures.experts.rank_block_delta``); RecLoRA forms each row's A_u, B_u
with one einsum and runs two ``bmm``. No Python loop over experts anywhere. Experts may be existing LoRA folders
(lorakit or PEFT, ``adapter_paths``) or fresh (A Kaiming, B zero: a fresh adapter equals the base model).

RecLoRA choices: the gate is per adapted layer (as ``Loreclayer``), Kaiming weights and zero biases. The
official code means to Kaiming-initialise each meta-LoRA's A_k with fan-in = in, but it initialises a reshaped
copy of a weight column (a no-op), so its A keeps ``nn.Linear``'s default over (in·r, N_m); we follow the intent.
The gate always ends in the softmax: the official ``--enable_softmax`` flag is off by default in
``finetune_lorec.py`` (raw gate logits would mix the bank) but every run in ``multi_run.sh`` turns it on.
Only the default gate (``which_in_gate`` unset) and soft routing are implemented: the token-level and
attention-over-LoRA gates are ablations, and the "hard" top-k mode indexes with ``~indices`` (a bug).
Defaults as the official scripts: targets q, v; N_m = 8, r = 8, α = 16, gate hidden 60, T = 1; dropout 0.05 (the argparse default; the scripts pass 0).

Keys: integer key ``j`` is the j-th name of ``sorted(key_to_expert)`` (the training loop's task ids are positions
in the sorted task names, ``lorakit.data.build_task_index``), so ``key_to_expert`` must name every task of the
training data (an id past its names is an error); a string key is looked up by name; a negative key or None
means "no key" (``default_expert``, the base model by default). Without ``key_to_expert``, key j is expert j
(ids past the experts have none) and string keys are ``adapter_names`` (``mixtures.keys.KeyTable``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..core.config import AdapterConfig, check_dropout, check_positive, check_positive_ints, field_error
from ..core.delta import LayerInfo
from ..core.errors import AdapterError
from ..core.registry import register_method
from ..core.routing import current_routing
from ..data import build_task_index
from ..mixtures.base import MixtureDelta
from ..mixtures.keys import KeyTable, check_mapping, check_task_experts
from ..mixtures.rank_blocks import LoraExperts, LoraExpertsConfig, drop_adapter_paths
from ..mixtures.router import RouterOutput
from ..mixtures.sources import prepare_from_sources


# -- routed_lora: hard (or fixed-weight) selection by a per-row key -----------------------------------------
@dataclass
class RoutedLoraConfig(LoraExpertsConfig):
    """``key_to_expert``: key name -> expert index (-1: base model) or a list of per-expert weights.
    ``default_expert``: the expert of rows without a key (-1: base). ``train_adapters``: train the experts (False
    freezes them)."""

    key_to_expert: dict[str, int | list[float]] | None = None
    default_expert: int = -1
    train_adapters: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mapping(type(self).__name__, "key_to_expert", self.key_to_expert, self.num_experts)
        if not -1 <= self.default_expert < self.num_experts:
            raise field_error(self, "default_expert", f" must be -1 (base) or in 0..{self.num_experts - 1}, "
                                                      f"got {self.default_expert}.")

    def check_examples(self, examples: Sequence[Any]) -> None:
        """Refuse data that would train no expert: no task key while keyless rows get the base (default_expert
        -1), or tasks that reach no expert / the wrong one (``mixtures.keys.check_task_experts``)."""
        tasks = list(build_task_index(examples))  # the data's sorted task names: the loop's task ids index them
        if not tasks and self.default_expert == -1:
            raise field_error(self, "default_expert", "=-1 sends rows without a task key to the base model and no "
                                                      "training example has one: nothing would train. Give the "
                                                      "examples a task (\"task\" in JSONL), or set default_expert "
                                                      "to an expert index.")
        check_task_experts(self, "key_to_expert", tasks, self.num_experts, self.adapter_names)


class RoutedLoraLinear(LoraExperts):
    def __init__(self, info: LayerInfo, config: RoutedLoraConfig):
        super().__init__(info, config, trainable=config.train_adapters)
        self.keys = KeyTable(config.num_experts, config.key_to_expert, config.default_expert, config.adapter_names)

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
    "routed_lora", config=RoutedLoraConfig, build=build_routed, prepare=prepare_from_sources,
    file_fields=drop_adapter_paths,
    example_routing=routed_example_routing, mergeable=False,
    description="LoRA experts selected per row by a key carried with the data (task id / input mode); no router.",
    paper="Phi-4-Mini mixture of LoRAs, Microsoft 2025, arXiv:2503.01743",
    variants={"routed_lora": {"expert_r": [4, 2, 4], "expert_alpha": [8, 4, 16],
                              "expert_use_rslora": [False, False, True]},
              "routed_lora_default": {"expert_r": [2, 2], "default_expert": 0, "lora_dropout": 0.1}},
)


# -- mm_lora: per-token modality selection -------------------------------------------------------------------
@dataclass
class MMLoraConfig(LoraExpertsConfig):
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
            if not -1 <= e < self.num_experts:
                raise field_error(self, "modality_to_expert", f"[{m}]={e}: use -1 or 0..{self.num_experts - 1}.")


class MMLoraLinear(LoraExperts):
    def __init__(self, info: LayerInfo, config: MMLoraConfig):
        super().__init__(info, config, trainable=config.train_adapters)
        table = config.modality_to_expert if config.modality_to_expert is not None else list(range(config.num_experts))
        onehot = torch.zeros(len(table) + 1, config.num_experts)  # last row: "no LoRA"
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
    "mm_lora", config=MMLoraConfig, build=build_mm, prepare=prepare_from_sources, file_fields=drop_adapter_paths,
    example_routing=mm_example_routing, mergeable=False,
    description="Modality-parallel LoRAs (Arcana MM-LoRA / Phi-4-MM): each token uses its modality's LoRA.",
    paper="Arcana MM-LoRA (project page); Phi-4-Multimodal, arXiv:2503.01743",
    variants={"mm_lora": {"expert_r": [4, 2], "expert_alpha": [8, 8]}},
)


# -- reclora: per-user weight-space mixture of meta-LoRAs ----------------------------------------------------
@dataclass
class RecLoraConfig(AdapterConfig):
    """``user_dim``: size of the per-row user vector (the CRM's user representation); required.

    - ``num_experts``: meta-LoRAs in the bank, N_m (``n_meta`` in files written before the rename).
    - ``r`` / ``lora_alpha``: each meta-LoRA's rank and alpha (scaling alpha / r).
    - ``lora_dropout``: dropout on the LoRA input, in [0, 1).
    - ``gate_hidden``: hidden width of the user gate MLP. ``gate_dropout``: its dropout.
    - ``temperature``: softmax temperature T of the gate. ``sqrt_after_softmax``: use √α instead of α.
    - ``user_key``: name of the user vector in ``routing(extras=...)``.
    """

    renamed_fields = {"n_meta": "num_experts"}

    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_experts: int = 8
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
            raise field_error(self, "user_dim", " must be set to the size of the user vector passed as "
                                                "routing(extras={'user_state': (batch, user_dim)}), got "
                                                f"{self.user_dim}.")
        check_positive_ints(self, "num_experts", "r", "gate_hidden")
        check_positive(self, "temperature")
        check_dropout(self, "gate_dropout")

    def check_examples(self, examples: Sequence[Any]) -> None:
        """Every example needs its user vector of ``user_dim`` numbers (a missing or wrong-sized one failed at
        the first batch, after the model loaded and the base was evaluated)."""
        for i, ex in enumerate(examples):
            vector = dict(ex.routing).get(self.user_key)
            if vector is None or len(vector) != self.user_dim:
                got = "none" if vector is None else f"{len(vector)} numbers"
                raise field_error(self, "user_dim", f"={self.user_dim}: example {i} of the data has {got} as its "
                                                    f"routing vector {self.user_key!r}; give every example "
                                                    f"{{\"routing\": {{\"{self.user_key}\": [{self.user_dim} "
                                                    "numbers]}}, or set user_dim to the vectors' size.")


class RecLoraLinear(MixtureDelta):
    """Meta-LoRA bank ``lora_A`` (N_m, r, in), ``lora_B`` (N_m, out, r) and this layer's user gate."""

    def __init__(self, info: LayerInfo, config: RecLoraConfig):
        super().__init__(info, config.num_experts)
        n, r = config.num_experts, config.r
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
        self.user_key, self.user_dim = config.user_key, config.user_dim

    def user_weights(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, α), both (batch, N_m), from the routing context's user vectors."""
        ctx = current_routing()
        u = None if ctx is None else ctx.extras.get(self.user_key)
        if u is None:
            raise AdapterError(f"reclora needs a user vector per row: run the forward inside "
                               f"routing(extras={{{self.user_key!r}: tensor (batch, user_dim)}}).")
        u = torch.as_tensor(u).to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        if u.dim() != 2 or u.shape[0] != batch or u.shape[1] != self.user_dim:
            raise AdapterError(f"reclora: {self.user_key!r} user vectors of shape {tuple(u.shape)}; expected (batch, "
                               f"user_dim) = ({batch}, {self.user_dim}): give every row a vector of user_dim numbers "
                               "(or set user_dim to the vectors' size).")
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
    variants={"reclora": {"num_experts": 3, "r": 4, "user_dim": 8},
              "reclora_sqrt": {"num_experts": 2, "r": 2, "user_dim": 8, "sqrt_after_softmax": True, "temperature": 2.0,
                               "lora_dropout": 0.0}},
)
