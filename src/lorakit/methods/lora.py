"""LoRA, rsLoRA and DoRA — the plain low-rank delta and its two PEFT-standard variants.

- LoRA: "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685.
  ``y = W x + s · B A x``, ``A ∈ R^{r×in}`` (Kaiming-uniform, a=√5), ``B ∈ R^{out×r}`` (zeros), ``s = α / r``.
- rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski, arXiv:2312.03732.
  ``s = α / √r``.
- DoRA: "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., arXiv:2402.09353.
  ``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row``, ``m`` initialised to ``‖W‖_row``; the norm is detached in the
  backward pass (paper §4.3). Written additively: ``Δ(x) = (m/n − 1) ⊙ W x + (m/n) ⊙ s·B A x``.

Parity: follows HF PEFT exactly (same parameter names, init, scaling, dropout placement; for DoRA with
dropout in training the base term uses the dropped-out input, as PEFT does), so files and outputs match PEFT.
Embeddings use PEFT's layout: ``lora_embedding_A`` (r, num_embeddings) zero-initialised,
``lora_embedding_B`` (embedding_dim, r) normal-initialised. Convolutions (nn.Conv1d/2d/3d): lora_conv.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ANY_VALUE, AdapterConfig, check_positive_ints, field_error
from ..core.delta import (Delta, LayerInfo, MergeTerms, RankUnits, building_for_file, embedding_scaled,
                          oriented_weight)
from ..core.errors import AdapterError, ConfigError, TargetError, did_you_mean
from ..core.inits import BaseEdit, find_init, list_inits
from ..core.registry import register_method
from ..quantize.nf4 import LOFTQ_BITS
from ._trainable_tokens import check_token_indices, plan_token_rows

INIT_CHOICES = (True, False, "gaussian", "orthogonal", "mica")
# PEFT's LoftQConfig fields and defaults (peft/tuners/lora/config.py:134-135)
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}
# Inits that only set A and B and leave the base weight alone (peft/tuners/lora/layer.py ``update_layer``:
# ``orthogonal_init``, ``mica_init``): a file saved with one of them is a plain LoRA for inference.
FACTOR_ONLY_INITS = ("orthogonal", "mica")


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: a key matches a dotted suffix of the module name as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def minor_left_vectors(weight: torch.Tensor, r: int) -> torch.Tensor:
    """MiCA's B (arXiv:2604.01694; peft/tuners/lora/layer.py ``mica_init``): the left singular vectors of ``weight``
    (out, in) for its ``r`` smallest singular values, (out, r) float32. Raises ConfigError when r > min(out, in)."""
    if r > min(weight.shape):
        raise ConfigError(f"init_lora_weights='mica' needs r <= min(out, in) = {min(weight.shape)} for a layer with "
                          f"weight {tuple(weight.shape)}, got r={r}.")
    return torch.linalg.svd(weight.float(), full_matrices=False)[0][:, -r:]  # singular values come descending


@dataclass
class LoraConfig(AdapterConfig):
    """Plain LoRA (+ ``use_rslora``, ``use_dora``). Field names and defaults are PEFT's.

    - ``r``: rank of the update B·A. ``lora_alpha``: scaling numerator (scaling alpha / r; alpha / √r with rsLoRA).
    - ``lora_dropout``: dropout on the adapter's input during training, in [0, 1).
    - ``use_rslora``: rank-stabilised scaling alpha / √r. ``use_dora``: DoRA's trained magnitude vector.
    - ``init_lora_weights``: True (A Kaiming, B zero), "gaussian" (A ~ N(0, 1/r)), False (both random, tests),
      "orthogonal" (PEFT's: A, B random with orthogonal row/column mixes, /10; BA ≠ 0 at init; even r; linear
      layers), "mica" (MiCA, arXiv:2604.01694: B = the r left singular vectors of W with the smallest singular
      values, frozen; A = 0; no DoRA), or a registered init (``lorakit.list_inits()``: "pissa", "pissa_niter_K",
      "olora", "loftq").
    - ``loftq_config``: LoftQ's settings with ``init_lora_weights="loftq"`` (PEFT's ``LoftQConfig`` as a dict):
      ``loftq_bits`` (4: NF4, 8: int8; default 4) and ``loftq_iter`` (alternating steps, >= 1; default 1).
    - ``lora_bias``: also train a bias on lora_B.
    - ``rank_pattern`` / ``alpha_pattern``: per-module rank / alpha, {module regex: value}, as PEFT.
    - ``trainable_token_indices``: token rows of an embedding trained as well (e.g. new special tokens), as PEFT: a
      list of indices (the input embedding) or {embedding module name: [indices]}; a tied lm_head follows the rows.
    """

    foreign_fields = {
        "fan_in_fan_out": ANY_VALUE,  # lorakit detects Conv1D layers itself
        "bias": "none", "megatron_config": None, "megatron_core": ANY_VALUE,
        "layer_replication": None,
        "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None,
        "use_bdlora": (None, False), "alora_invocation_tokens": None, "use_qalora": False,
        "qalora_group_size": ANY_VALUE, "target_parameters": None,
        "ensure_weight_tying": ANY_VALUE, "runtime_config": ANY_VALUE,
    }

    init_settings_fields = {"eva_config": "eva", "corda_config": "corda", "lora_ga_config": "lora_ga"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    loftq_config: dict[str, int] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(default=None, metadata={
        "help": "embedding rows trained too (e.g. new special tokens), as PEFT: [indices] of the input embedding or "
                "{module name: [indices]}; a tied lm_head follows them"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        self._check_loftq_config()
        check_token_indices(self.trainable_token_indices)
        # PEFT's LoraConfig refuses these pairs, so it could not load the file lorakit would write
        if self.lora_bias and self.use_dora:
            raise field_error(self, "lora_bias", "=True is not supported with use_dora=True (PEFT refuses the pair "
                                                 "and could not load the adapter); set one of them False.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise field_error(self, "lora_bias", f"=True needs init_lora_weights True or False, got "
                                                 f"{self.init_lora_weights!r} (PEFT refuses the pair and could not "
                                                 f"load the adapter).")
        if self.init_lora_weights not in INIT_CHOICES and find_init(self.init_lora_weights) is None:
            names = [i.name for i in list_inits()]
            raise field_error(self, "init_lora_weights", f"={self.init_lora_weights!r} is not supported; choose one "
                              f"of {INIT_CHOICES} or a registered init ({', '.join(i.spellings for i in list_inits())})."
                              f"{did_you_mean(str(self.init_lora_weights), [str(c) for c in INIT_CHOICES] + names)}")
        if self.init_lora_weights == "orthogonal":
            odd = [f"r={self.r}"] if self.r % 2 else []
            odd += [f"rank_pattern[{k!r}]={v}" for k, v in self.rank_pattern.items() if v % 2]
            if odd:
                raise field_error(self, "init_lora_weights", f"='orthogonal' needs an even rank (it splits one "
                                  f"r×r orthogonal matrix into two halves, as PEFT); got {', '.join(odd)}.")
        if self.init_lora_weights == "mica" and self.use_dora:
            raise field_error(self, "init_lora_weights", "='mica' is not supported with use_dora=True (both are "
                                                         "PEFT LoRA variants of the layer); set use_dora=False.")
        for k, v in self.rank_pattern.items():
            if v <= 0:
                raise field_error(self, "rank_pattern", f"[{k!r}] must be positive, got {v}.")
        for k, v in self.alpha_pattern.items():  # each becomes a module's lora_alpha: the same rule, named here
            if not 0 < v < float("inf"):
                raise field_error(self, "alpha_pattern", f"[{k!r}] must be > 0 and finite (that module's lora_alpha), "
                                                         f"got {v}.")
        for k in [*self.rank_pattern, *self.alpha_pattern]:
            self._check_regex(f"rank_pattern / alpha_pattern key", k)

    def _check_loftq_config(self) -> None:
        """``loftq_config`` completed with PEFT's defaults under init "loftq"; ConfigError for an unknown key, a bit
        width or count PEFT refuses (peft/utils/loftq_utils.py:59-62: 4 or 8 bits, >= 1 iteration) or settings
        without the init."""
        given = self.loftq_config or {}
        if not isinstance(given, Mapping):
            raise field_error(self, "loftq_config", f" must be a dict like {LOFTQ_DEFAULTS}, got {given!r}.")
        if self.init_lora_weights != "loftq":
            if given:
                raise field_error(self, "loftq_config", f"={dict(given)!r} sets LoftQ, but init_lora_weights="
                                  f"{self.init_lora_weights!r}; set init_lora_weights='loftq' or drop loftq_config "
                                  "(PEFT ignores it then).")
            self.loftq_config = {}
            return
        for key in given:
            if key not in LOFTQ_DEFAULTS:
                raise field_error(self, "loftq_config", f" has no key {key!r}.{did_you_mean(key, LOFTQ_DEFAULTS)} "
                                  f"Keys (PEFT's LoftQConfig): {', '.join(LOFTQ_DEFAULTS)}.")
        merged = {**LOFTQ_DEFAULTS, **given}
        bits, steps = merged["loftq_bits"], merged["loftq_iter"]
        if isinstance(bits, bool) or bits not in LOFTQ_BITS:
            raise field_error(self, "loftq_config", f"['loftq_bits']={bits!r}: LoftQ quantizes to 4 bits (NF4) or 8 "
                                                    "bits (int8), as PEFT; choose 4 or 8.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise field_error(self, "loftq_config", f"['loftq_iter']={steps!r} must be an integer >= 1 (the "
                                                    "alternating quantize / SVD steps).")
        self.loftq_config = merged

    def check_patterns(self, targets: list[str]) -> None:
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                if not any(re.match(rf"(.*\.)?({key})$", t) for t in targets):
                    raise TargetError(
                        f"LoraConfig.{field_name} key {key!r} matches none of the {len(targets)} adapted modules "
                        f"(a key matches a module name or a dotted suffix of it, as a regex: PEFT's rule)."
                        f"{did_you_mean(key, {t.rsplit('.', 1)[-1] for t in targets} | set(targets))} "
                        f"Adapted modules include: {', '.join(targets[:4])}{', ...' if len(targets) > 4 else ''}.")

    def extra_deltas(self, model: nn.Module, targets: list[str]) -> dict[str, tuple[nn.Module, LayerInfo, Delta]]:
        """The trainable token rows (_trainable_tokens.py) ``trainable_token_indices`` asks for."""
        if self.trainable_token_indices is None:
            return {}
        return plan_token_rows(model, self.trainable_token_indices, lora_targets=targets,
                               modules_to_save=self.modules_to_save)

    def requested_init(self) -> str | None:
        init = self.init_lora_weights
        return init if isinstance(init, str) and init not in INIT_CHOICES else None

    def with_init(self, init: str) -> "LoraConfig":
        return replace(self, init_lora_weights=init, loftq_config=self.loftq_config if init == "loftq" else {})

    def for_module(self, module_name: str) -> "LoraConfig":
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        if r == self.r and alpha == self.lora_alpha:
            return self
        return replace(self, r=r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(Delta):
    """``Δ(x) = s · B A dropout(x)`` for nn.Linear and Conv1D bases."""

    plain_units = True
    frozen_B = False  # MiCA's lora_B: saved, never trained

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module | None = None):
        super().__init__(info)
        self.r = config.r
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(info.in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, info.out_features, bias=config.lora_bias)
        self.frozen_B = config.init_lora_weights == "mica"
        if self.frozen_B:
            self._mica_init(base_layer)
        else:
            self.reset_parameters(config.init_lora_weights)
        if config.lora_bias:
            self.plain_units = False  # units carry no bias: per-row stacking would drop it

    def frozen_names(self) -> tuple[str, ...]:
        return ("lora_B.weight",) if self.frozen_B else ()

    def _mica_init(self, base_layer: nn.Module | None) -> None:
        """MiCA: B = :func:`minor_left_vectors` of the base weight, A = 0, so BA = 0 and the base is untouched."""
        nn.init.zeros_(self.lora_A.weight)
        if base_layer is None or self.lora_B.weight.is_meta or base_layer.weight.is_meta or building_for_file():
            return  # only sizing (a loader on meta), a loader copying the file's B in next, or no base given
        with torch.no_grad():
            self.lora_B.weight.copy_(minor_left_vectors(oriented_weight(base_layer, self.info), self.r))

    def reset_parameters(self, init: bool | str) -> None:
        if init is False:  # nn.Linear's own random init for both: a non-zero delta, used for testing
            return
        if init == "orthogonal":  # peft/tuners/lora/layer.py ``orthogonal_init``; BA ≠ 0 at init, base untouched
            q = torch.linalg.qr(torch.randn(self.r, self.r))[0]  # (r, r) orthogonal
            with torch.no_grad():
                a = torch.randn(self.info.in_features, self.r // 2) @ q[0::2]  # (in, r)
                b = torch.randn(self.r // 2, self.info.out_features).T @ q[1::2]  # (out, r)
                self.lora_A.weight.copy_(a.T / 10)
                self.lora_B.weight.copy_(b / 10)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.lora_out(x.to(self.lora_A.weight.dtype)).to(base_out.dtype)

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight_b = self.lora_B.weight
        if (torch.is_grad_enabled() or acc.dtype != weight_b.dtype or self.lora_B.bias is not None
                or type(self).forward is not LoraLinear.forward):
            return super().accumulate(acc, x, base_out, base_layer)
        # One BLAS call does expand, scaling and residual add: acc + s·(h Bᵀ), h = A·dropout(x)  (N, r)
        h = self.lora_A(self.lora_dropout(x)).reshape(-1, self.r)
        return torch.addmm(acc.reshape(-1, acc.shape[-1]), h, weight_b.t(), alpha=self.scaling).view(acc.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, r) @ (r, in)

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_B.bias is None else self.lora_B.bias.float() * self.scaling

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_A.weight, B=self.lora_B.weight, scaling=self.scaling, dropout=self.lora_dropout)


def initial_norm(weight: torch.Tensor, factor: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
    """DoRA's initial magnitude ``norm(W in float32)`` (``‖W + ΔW‖`` per output row, shape ``(weight.shape[0],)``,
    ``norm`` closing over ΔW). Without the arithmetic when its value is not wanted: an empty ``(weight.shape[0],)``
    tensor on the meta device when the LoRA ``factor`` is there (a loader sizing a file's tensors: meta arithmetic
    costs more than the real one), zeros when a loader copies the file's magnitude in next
    (:func:`~lorakit.core.delta.values_from_file`)."""
    if factor.is_meta:
        return torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
    if building_for_file():
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    return norm(weight.float())


class DoraLinear(LoraLinear):
    """DoRA on nn.Linear / Conv1D: a learned per-output-row magnitude over the LoRA-updated direction."""

    plain_units = False

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module):
        super().__init__(info, config)
        with torch.no_grad():
            norm = initial_norm(oriented_weight(base_layer, info), self.lora_A.weight,
                                lambda weight: self._weight_norm(weight, self.delta_weight()))
        self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)
        self._merge_scale: torch.Tensor | None = None

    @staticmethod
    def _weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + delta, dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        x = x.to(dtype)
        weight = oriented_weight(base_layer, self.info).to(dtype)
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach()
        norm = self._weight_norm(weight, self.scaling * lora_weight).detach()  # detached: DoRA paper §4.3
        scale = self.lora_magnitude_vector / norm  # (out,)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            base_term = F.linear(x, weight)
        else:
            bias = getattr(base_layer, "bias", None)
            # W x without the bias, rounded to the base's dtype as the base computes it (and PEFT subtracts it),
            # also when Delta.accumulate hands base_out over widened
            base_term = ((base_out - bias).to(bias.dtype) if bias is not None else base_out).to(dtype)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        return ((scale - 1) * base_term + scale * lora).to(base_out.dtype)

    def merge_terms(self, base_weight: torch.Tensor) -> MergeTerms:
        dw = self.delta_weight()
        scale = (self.lora_magnitude_vector.detach().float() / self._weight_norm(base_weight, dw)).detach()
        self._merge_scale = scale
        return self._terms(scale, dw)

    def unmerge_terms(self) -> MergeTerms:
        if self._merge_scale is None:
            raise RuntimeError("DoRA unmerge without a preceding merge")
        return self._terms(self._merge_scale, self.delta_weight())

    def _terms(self, scale: torch.Tensor, dw: torch.Tensor) -> MergeTerms:
        bias = self.delta_bias()
        return MergeTerms(weight=scale[:, None] * dw, row_scale=scale, bias=None if bias is None else scale * bias)


class LoraEmbedding(Delta):
    """``Δ(ids) = s · embed(ids; Aᵀ) Bᵀ`` for nn.Embedding bases (PEFT's lora_embedding_A/B layout)."""

    layer_kinds = ("embedding",)

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module | None = None):
        super().__init__(info)
        if config.lora_bias:
            raise ConfigError("lora_bias=True is not supported for embedding layers (as in PEFT); exclude them or set it False.")
        self.r = config.r
        self.scaling = config.scaling
        # Dropout on token ids is meaningless; PEFT keeps the module but never applies it to embeddings.
        self.lora_embedding_A = nn.Parameter(torch.randn(config.r, info.in_features))  # (r, num_embeddings)
        self.lora_embedding_B = nn.Parameter(torch.randn(info.out_features, config.r))  # (dim, r)
        self.frozen_B = config.init_lora_weights == "mica"
        if self.frozen_B:
            nn.init.zeros_(self.lora_embedding_A)
            if (base_layer is not None and not base_layer.weight.is_meta and not self.lora_embedding_B.is_meta
                    and not building_for_file()):  # (a loader copies the file's B in next)
                with torch.no_grad():
                    self.lora_embedding_B.copy_(minor_left_vectors(base_layer.weight.T, config.r))
        elif config.init_lora_weights is not False:  # "orthogonal" too: PEFT's Embedding has no orthogonal init
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def frozen_names(self) -> tuple[str, ...]:
        return ("lora_embedding_B",) if self.frozen_B else ()

    def lora_out(self, ids: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=base_layer.padding_idx,
                              max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
                              scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse)
        out = (after_a @ self.lora_embedding_B.T) * self.scaling
        # Gemma's, BioGPT's scaled embeddings
        return embedding_scaled(out, getattr(base_layer, "embed_scale", None), base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.lora_out(x, base_layer).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:  # (dim, num_embeddings), i.e. (out, in)
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()) * self.scaling

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_embedding_A, B=self.lora_embedding_B, scaling=self.scaling)


class DoraEmbedding(LoraEmbedding):
    """DoRA on nn.Embedding: magnitude per embedding dimension, as PEFT."""

    def __init__(self, info: LayerInfo, config: LoraConfig, base_layer: nn.Module):
        super().__init__(info, config)
        with torch.no_grad():
            norm = initial_norm(oriented_weight(base_layer, info), self.lora_embedding_A,
                                lambda weight: torch.linalg.norm(weight + self.delta_weight(), dim=1))
        self.lora_magnitude_vector = nn.Parameter(norm)  # (dim,)
        self._merge_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.lora_embedding_A.dtype
        weight = oriented_weight(base_layer, self.info).to(dtype)
        lora_weight = (self.lora_embedding_B @ self.lora_embedding_A).detach() * self.scaling
        scale = self.lora_magnitude_vector / torch.linalg.norm(weight + lora_weight, dim=1).detach()
        return ((scale - 1) * base_out.to(dtype) + scale * self.lora_out(x, base_layer)).to(base_out.dtype)

    merge_terms = DoraLinear.merge_terms
    unmerge_terms = DoraLinear.unmerge_terms
    _terms = DoraLinear._terms
    _weight_norm = staticmethod(DoraLinear._weight_norm)

    def delta_bias(self) -> torch.Tensor | None:
        return None


_DELTAS = {("linear", False): LoraLinear, ("linear", True): DoraLinear,
           ("embedding", False): LoraEmbedding, ("embedding", True): DoraEmbedding}


def build_lora(base_layer: nn.Module, info: LayerInfo, config: LoraConfig, path: str = "") -> Delta:
    if info.kind == "conv":  # nn.Conv1d/2d/3d: lora_conv.py (imported here: it builds on the classes above)
        from .lora_conv import DoraConv, LoraConv

        return (DoraConv if config.use_dora else LoraConv)(info, config, base_layer, path)
    return _DELTAS[(info.kind, config.use_dora)](info, config, base_layer)


def lora_state_from_factors(info: LayerInfo, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                            magnitude: torch.Tensor | None = None, *, lora_bias: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` a LoRA delta on a layer described by ``info`` holds for factors with scaling 1 (the
    delta's own param names and shapes; what ``units()`` reads back): ``A`` (r, in·Πkernel), ``B`` (out, r),
    ``bias`` (out,) or None (zeros when ``lora_bias``), DoRA ``magnitude`` (out,) or None. Writes a merged
    adapter's file without building the delta; dtype and device are left to the caller."""
    if info.kind == "embedding":  # (r, num_embeddings), (dim, r), DoRA (dim,): all direct parameters, in this order
        out = {"lora_embedding_A": A, "lora_embedding_B": B}
        return out if magnitude is None else {**out, "lora_magnitude_vector": magnitude}
    out = {}
    if magnitude is not None:  # DoRA (out,), a convolution's (1, out, 1, ...): a direct parameter, saved first
        out["lora_magnitude_vector"] = magnitude.reshape(1, -1, *(1,) * info.conv.dims) if info.kind == "conv" else magnitude
    if info.kind == "conv":  # A (r, in·Πk) -> (r, in, *kernel), B (out, r) -> (out, r, 1, ...); groups == 1
        A = A.reshape(A.shape[0], info.in_features, *info.conv.kernel_size)
        B = B.reshape(*B.shape, *(1,) * info.conv.dims)
    out.update({"lora_A.weight": A, "lora_B.weight": B})
    if lora_bias:
        out["lora_B.bias"] = bias if bias is not None else B.new_zeros(B.shape[0])
    return out


def lora_file_fields(config: LoraConfig, layers: list[LayerInfo]) -> dict[str, Any]:
    """PEFT fields derived from the adapted layers rather than set by the user."""
    return {"fan_in_fan_out": any(i.fan_in_fan_out and i.kind == "linear" for i in layers), "bias": "none",
            "task_type": None}


def lora_to_original_base(config: LoraConfig, file_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                          edits: Mapping[str, BaseEdit]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter as a rank-2r LoRA on the original base, as PEFT's ``path_initial_model_for_weight_conversion``:
    with ``W_res = W_orig + s_e B_e A_e``, ``ΔW' = s B A + s_e B_e A_e = s [B, (s_e/s) B_e] [A; A_e]``. ``r``,
    ``lora_alpha`` (×√2 under rsLoRA), ``rank_pattern`` and ``alpha_pattern`` double so every scaling stays;
    layers the init did not change get zero blocks. ``init_lora_weights`` becomes True (a plain LoRA)."""
    swapped = [path for path, edit in edits.items() if not isinstance(edit, BaseEdit)]
    if swapped:
        raise AdapterError(f"init {config.init_lora_weights!r} replaced the base weight of {swapped[0]!r} by one of "
                           "full rank (LoftQ: its quantized value), which no rank-2r LoRA can fold in, so there is no "
                           "LoRA of it for the untouched base (export, original_base=True). Use the adapter as it is: "
                           "loading it redoes the init on the original base (deterministically), as PEFT does.")
    if config.use_dora:
        raise AdapterError("a DoRA adapter cannot be rewritten for the original base: its magnitude is relative to "
                           "the changed base weight (PEFT's subtract_mutated_init converts it anyway, keeping that "
                           "magnitude, which does not give the trained model on the original base).")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise AdapterError("rank_pattern/alpha_pattern with use_rslora cannot keep their scalings when the rank "
                           "doubles (as in PEFT); save the adapter as is.")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path, _, param = key.rpartition(".lora_")
        param = "lora_" + param
        edit = edits.get(path)
        if param in ("lora_A.weight", "lora_embedding_A"):
            extra = edit.A if edit is not None else torch.zeros_like(value)
            out[key] = torch.cat([value, extra.to(value)], dim=0)  # (2r, in)
        elif param in ("lora_B.weight", "lora_embedding_B"):
            if edit is not None:
                extra = edit.B * (edit.scaling / config.for_module(path).scaling)
            else:
                extra = torch.zeros_like(value)
            out[key] = torch.cat([value, extra.to(value)], dim=1)  # (out, 2r)
        else:
            out[key] = value
    file_config = dict(file_config, init_lora_weights=True, r=2 * config.r,
                       lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
                       rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                       alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return file_config, out


register_method(
    "lora", config=LoraConfig, build=build_lora, peft_type="LORA", layer_kinds=("linear", "embedding", "conv"),
    description="Low-rank update s·BA on frozen layers (+ use_rslora, use_dora); PEFT-identical.",
    paper="Hu et al. 2021, arXiv:2106.09685 (rsLoRA 2312.03732, DoRA 2402.09353)",
    file_fields=lora_file_fields, to_original_base=lora_to_original_base,
    variants={"lora": {}, "rslora": {"use_rslora": True, "lora_alpha": 16}, "dora": {"use_dora": True},
              "lora_bias": {"lora_bias": True}, "lora_gaussian": {"init_lora_weights": "gaussian"}},
)
