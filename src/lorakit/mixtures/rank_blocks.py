"""N LoRA experts stacked as rank blocks of one wide LoRA, the delta that ``routed_lora``, ``mm_lora``, MeteoRA and
X-LoRA share; each method adds only how the expert weights are chosen (a key, a modality map, a router, a head).

``lora_A`` (R, in) and ``lora_B`` (out, R) hold every expert's factors (R = Σ_e r_e), an ``owner`` map gives each
rank's expert and ``rank_scaling`` its expert's scaling (alpha / r, or alpha / √r with rsLoRA), so ranks, alphas
and rsLoRA may differ per expert and a forward is two GEMMs whatever the number of experts
(``mixtures.experts.rank_block_delta``, no loop over experts):

    y = W x + g · Σ_e w_e(x) · s_e · B_e A_e dropout(x)

Experts are existing LoRA folders (lorakit or PEFT, ``adapter_paths``; read by ``mixtures.sources``) or fresh
(A Kaiming as each block's own ``nn.Linear`` would be, B zero: a fresh expert adds nothing).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig, check_positive_ints, field_error, field_list
from ..core.delta import LayerInfo
from ..core.errors import AdapterLoadError
from .base import MixtureDelta
from .experts import expand_to_ranks, rank_block_delta
from .router import RouterOutput
from .sources import prepare_from_sources, read_lora_source


@dataclass
class LoraExpertsConfig(AdapterConfig):
    """N LoRA experts: ``adapter_paths`` (existing LoRA folders; ranks, alphas, targets read from them) or
    ``num_experts`` / ``expert_r`` (fresh experts, B = 0; default r = 8, α = 2r), ``num_experts`` being
    ``n_adapters`` in older files. ``adapter_names`` label the slots (default: the folders' names).

    - ``expert_alpha``: each expert's LoRA alpha (read from the folders with ``adapter_paths``; default 2r).
    - ``expert_use_rslora``: per expert, scale by alpha/√r instead of alpha/r (read from the folders).
    - ``lora_dropout``: dropout on the experts' input, one mask for all experts, in [0, 1).

    Raises ConfigError for an empty ``adapter_paths``, a count that disagrees with them or with the per-expert
    lists, non-positive ranks, or repeated ``adapter_names``.
    """

    renamed_fields = {"n_adapters": "num_experts"}

    adapter_paths: list[str] | None = None
    adapter_names: list[str] | None = None
    num_experts: int | None = None
    expert_r: list[int] = field_list()
    expert_alpha: list[float] = field_list()
    expert_use_rslora: list[bool] = field_list()
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_paths is not None:
            if not self.adapter_paths:
                raise field_error(self, "adapter_paths", " is empty; give LoRA adapter folders or None.")
            if self.num_experts is not None and self.num_experts != len(self.adapter_paths):
                raise field_error(self, "num_experts", f"={self.num_experts} but {len(self.adapter_paths)} "
                                                       "adapter_paths were given; leave num_experts unset.")
            self.num_experts = len(self.adapter_paths)
        elif self.num_experts is None:
            if not self.expert_r:
                raise field_error(self, "num_experts", " is unset: give adapter_paths (existing LoRA adapters), "
                                                       "num_experts or expert_r.")
            self.num_experts = len(self.expert_r)
        n = self.num_experts
        check_positive_ints(self, "num_experts")
        if self.adapter_paths is None:  # fresh experts: explicit defaults, so the saved config is complete
            self.expert_r = self.expert_r or [8] * n
            self.expert_alpha = self.expert_alpha or [2.0 * r for r in self.expert_r]
            self.expert_use_rslora = self.expert_use_rslora or [False] * n
        for name in ("expert_r", "expert_alpha", "expert_use_rslora", "adapter_names"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise field_error(self, name, f" has {len(value)} entries for {n} experts.")
        if any(r <= 0 for r in self.expert_r):
            raise field_error(self, "expert_r", f" must be positive ranks, got {self.expert_r}.")
        if self.adapter_names is not None and len(set(self.adapter_names)) != n:
            raise field_error(self, "adapter_names", f" must be {n} distinct names, got {self.adapter_names}.")

    def check_inputs(self) -> None:
        """Read every ``adapter_paths`` folder as a source (``sources.prepare_from_sources``, which needs no model):
        a missing folder, a DoRA / PiSSA / non-LoRA adapter or ranks that disagree with ``expert_r`` fail here."""
        prepare_from_sources(None, self)


def drop_adapter_paths(config: LoraExpertsConfig, layers: list[LayerInfo]) -> dict[str, Any]:
    """The ``file_fields`` hook of methods built on ``LoraExperts``: the experts' factors are in the saved file, so
    loading it must not need (or re-read) the source adapters."""
    return {"adapter_paths": None}


class LoraExperts(MixtureDelta):
    """N LoRA experts stacked as rank blocks: ``lora_A`` (R_total, in), ``lora_B`` (out, R_total), ``owner``
    (R_total,) expert of each rank, ``rank_scaling`` (R_total,). Frozen experts (``trainable=False``) name both
    factors in ``frozen_names``: saved with the adapter, never trained."""

    def __init__(self, info: LayerInfo, config: LoraExpertsConfig, trainable: bool):
        super().__init__(info, config.num_experts)
        ranks = list(config.expert_r)
        A = torch.empty(sum(ranks), info.in_features)  # (R_total, in)
        # block starts summed in Python: the build also runs on the meta device (a loader sizing it), where a
        # tensor holds no values to read back
        for start, r in zip(itertools.accumulate([0] + ranks), ranks):
            nn.init.kaiming_uniform_(A[start:start + r], a=math.sqrt(5))  # each block as its own nn.Linear would
        B = torch.zeros(info.out_features, sum(ranks))  # (out, R_total)
        self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
        self.experts_frozen = not trainable
        owner = torch.arange(len(ranks)).repeat_interleave(torch.tensor(ranks), output_size=sum(ranks))  # (R_total,)
        scaling = torch.tensor([a / (math.sqrt(r) if rs else r) for r, a, rs in
                                zip(ranks, config.expert_alpha, config.expert_use_rslora)])
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("rank_scaling", scaling[owner], persistent=False)  # (R_total,)
        self.ranks = ranks
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def frozen_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if self.experts_frozen else ()

    @torch.no_grad()
    def set_expert(self, index: int, A: torch.Tensor, B: torch.Tensor, source: str | None = None) -> None:
        """Copy expert ``index``'s factors, A (r, in) and B (out, r), into its rank block. Raises AdapterLoadError
        when the shapes do not fit this layer and the expert's rank, naming ``source`` (the expert's folder and
        module, when it came from one) or else the expert's index."""
        start, r = sum(self.ranks[:index]), self.ranks[index]
        want_a, want_b = (r, self.info.in_features), (self.info.out_features, r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            where = f"source adapter {source}" if source is not None else f"expert {index}"
            fits = A.dim() == 2 and B.dim() == 2 and (A.shape[1], B.shape[0]) == (want_a[1], want_b[0])
            why = (f"its adapter_config.json says r={r}, but the tensors have rank {A.shape[0]} (the config was "
                   "edited, or belongs to another adapter)" if fits and A.shape[0] == B.shape[1] != r else
                   "is it for another base model, or does it use a per-module rank?")
            raise AdapterLoadError(f"{where}: LoRA factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do "
                                   f"not fit this layer and rank (expected {want_a}, {want_b}); {why}")
        self.lora_A[start:start + r] = A.to(self.lora_A.dtype)
        self.lora_B[:, start:start + r] = B.to(self.lora_B.dtype)

    def load_sources(self, config: LoraExpertsConfig, path: str) -> "LoraExperts":
        """Fill each expert from its source folder's factors for module ``path`` (``config.adapter_paths``)."""
        for i, directory in enumerate(config.adapter_paths or []):
            factors = read_lora_source(directory).factors(path)
            if factors is not None:  # else the block stays a fresh LoRA (A Kaiming, B zero): no effect
                self.set_expert(i, *factors, source=f"{directory} (module {path!r})")
        return self

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, extra_scale: float = 1.0) -> torch.Tensor:
        """``Σ_e w_e s_e B_e A_e dropout(x)`` for x (..., in) and expert weights broadcastable to (..., E)."""
        x = x.to(self.lora_A.dtype)
        gate = expand_to_ranks(weights.to(x.dtype), self.owner, self.rank_scaling.to(x.dtype) * extra_scale)
        return rank_block_delta(self.lora_dropout(x), self.lora_A, self.lora_B, gate)

    def record(self, weights: torch.Tensor, x_shape: torch.Size, logits: torch.Tensor | None = None) -> None:
        """Routing statistics and traces only (``record_routing``) of weights broadcastable to (..., E)."""
        with torch.no_grad():
            w = weights.expand(*x_shape[:-1], weights.shape[-1]).reshape(-1, weights.shape[-1]).float()
            lg = w if logits is None else logits.reshape(-1, logits.shape[-1]).float()
            probs = w if logits is None else torch.softmax(lg, -1)
            self.observe(RouterOutput(logits=lg, probs=probs, weights=w, selected=w != 0), x_shape)
