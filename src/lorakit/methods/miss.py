"""MiSS / Bone — "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (formerly "Bone: Block
Affine Adaptation of Large Language Models" / DiSHA), Kang & Yin, arXiv:2409.15371. PEFT's ``MissConfig``.

One trained block ``D`` shared by every r-wide input shard of the weight (W (out, in) split into shards along in):

- default (``init_weights=True``, "MiSS"): ``D ∈ R^{r×out}``, ``ΔW[o, i] = D[i mod r, o]``, so
  ``Δ(x) = (Σ_g x_g) D`` with ``x_g`` the g-th r-wide slice of ``x`` (zero-padded when ``in % r ≠ 0``);
- ``init_weights="mini"``: ``D ∈ R^{r×mini_r}`` repeated along out (``out % mini_r == 0``): ``ΔW[o, i] = D[i mod r,
  o mod mini_r]`` — r·mini_r parameters per layer;
- ``init_weights="bat"`` (Block-Affine Transformation, the original Bone): ``D ∈ R^{(out/r)×r×r}``; with ``W_ij`` the
  (r×r) block at out-block i, in-block j: ``ΔW_ij = W_ij D_i + D_i`` — the update depends on the frozen weight,
  needs ``in % r == out % r == 0``;
- ``init_weights=False``: the default layout with D Kaiming-uniform (a=√5), a non-zero start (for tests).

``D = 0`` at init ⇒ ΔW = 0. No scaling factor (PEFT's scale ops are no-ops for MiSS).

Follows HF PEFT ``peft/tuners/miss/layer.py`` (``MissLinear.forward``, ``get_delta_weight`` for bat,
``get_delta_weight_miss`` for the others); same parameter name (``miss_block``) and shapes, so files are
interchangeable (PEFT adapts nn.Linear only; lorakit also takes GPT-2 Conv1D, in the (out, in) orientation).
One difference: PEFT chains several active bat adapters (the second sees W + ΔW₁); lorakit adds their deltas,
each computed from the frozen W.

Learning rate: every entry of ΔW is an entry of D, so one Adam step of about ±lr on D moves every weight of the
layer by ±lr (LoRA's step on B reaches W through A's ~1/√in entries). MiSS therefore wants a lower lr than LoRA on
the same model; the authors train it at 2e-5 (JL-er/MiSS scripts/math/run_miss.sh, r=64), as does PEFT's
examples/miss_finetuning/README.md. Measured on the bundled base (reverse task, r=64, `lorakit train` defaults
but --lr; lorakit and PEFT give the same losses, tests/methods/test_miss.py): 6 steps at the CLI's lr 3e-3 take
exact match 0.44 -> 0.01 (the first steps raise the loss from 0.6 to 3-4), 3e-4 -> 0.49, 1e-4 -> 0.52; 50 steps:
3e-3 0.52, 1e-3 0.67, 3e-4 0.58 (LoRA r=8 at 3e-3: 0.60). Pass --lr 1e-3 or lower for MiSS there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, check_dropout, check_positive_ints, field_error
from ..core.delta import Delta, LayerInfo, MergeTerms, oriented_weight
from ..core.errors import AdapterError, TargetError, did_you_mean
from ..core.registry import register_method

INIT_CHOICES = (True, False, "bat", "mini")


@dataclass
class MissConfig(AdapterConfig):
    """PEFT's ``MissConfig``: ``r`` shard width along in; ``mini_r`` (for ``"mini"``) width along out;
    ``init_weights`` selects the variant (True: MiSS, "bat", "mini", False: random D); ``miss_dropout``: dropout on
    the layer input before the update. Wants a lower learning rate than LoRA (see the module docstring: about 1e-3
    or lower where LoRA takes 3e-3)."""

    foreign_fields = {"bias": "none"}

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r", "mini_r")
        check_dropout(self, "miss_dropout")
        if self.init_weights not in INIT_CHOICES:
            raise field_error(self, "init_weights", f"={self.init_weights!r} is not one of {INIT_CHOICES}."
                                                    f"{did_you_mean(str(self.init_weights), ['bat', 'mini'])}")


class MissLinear(Delta):
    """Shard-shared block ``D`` = ``miss_block``: (r, out) default, (r, mini_r) mini."""

    def __init__(self, info: LayerInfo, config: MissConfig):
        super().__init__(info)
        if config.r > info.in_features:
            raise TargetError(f"MiSS r={config.r} exceeds the layer's in_features={info.in_features}; lower r.")
        self.r = config.r
        cols = config.mini_r if config.init_weights == "mini" else info.out_features
        if config.init_weights == "mini" and info.out_features % config.mini_r:
            raise TargetError(f"MiSS mini: out_features={info.out_features} is not divisible by mini_r={config.mini_r}.")
        self.miss_block = nn.Parameter(torch.zeros(config.r, cols))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.miss_dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    def full_block(self) -> torch.Tensor:
        """D widened to (r, out) (mini repeats its mini_r columns)."""
        return self.miss_block.repeat(1, self.info.out_features // self.miss_block.shape[1])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        D = self.full_block()
        x = F.pad(x, (0, -x.shape[-1] % self.r)).to(D.dtype)  # (..., ⌈in/r⌉·r)
        shards = self.miss_dropout(x).reshape(*x.shape[:-1], -1, self.r)  # (..., in/r, r)
        return (shards.sum(dim=-2) @ D).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        D = self.full_block().float()
        return D.T[:, torch.arange(self.info.in_features, device=D.device) % self.r]  # (out, in)


class MissBatLinear(Delta):
    """Bone's block-affine update: ``D`` = ``miss_block`` (out/r, r, r), ``ΔW_ij = W_ij D_i + D_i``."""

    def __init__(self, info: LayerInfo, config: MissConfig):
        super().__init__(info)
        if info.in_features % config.r or info.out_features % config.r:
            raise TargetError(f"MiSS bat needs in_features ({info.in_features}) and out_features ({info.out_features}) "
                              f"divisible by r={config.r}; pick another r or target.")
        self.r = config.r
        self.miss_block = nn.Parameter(torch.zeros(info.out_features // config.r, config.r, config.r))
        self.miss_dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()
        self._merged_terms: MergeTerms | None = None

    def delta_from(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) for the frozen weight (out, in), in the block's dtype."""
        D = self.miss_block
        out, inp = weight.shape
        r = self.r
        blocks = weight.to(D.dtype).reshape(out // r, r, inp // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
        return (blocks @ D + D).permute(1, 2, 0, 3).reshape(out, inp)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dw = self.delta_from(oriented_weight(base_layer, self.info).detach())
        return F.linear(self.miss_dropout(x.to(dw.dtype)), dw).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError("MiSS bat's ΔW depends on the base weight; it has no standalone delta_weight "
                           "(merge it into its base instead).")

    def merge_terms(self, base_weight: torch.Tensor) -> MergeTerms:
        self._merged_terms = MergeTerms(weight=self.delta_from(base_weight.float()).detach().float())
        return self._merged_terms

    def unmerge_terms(self) -> MergeTerms:
        if self._merged_terms is None:
            raise RuntimeError("MiSS bat unmerge without a preceding merge")
        return self._merged_terms


def build_miss(base_layer: nn.Module, info: LayerInfo, config: MissConfig, path: str = "") -> Delta:
    return MissBatLinear(info, config) if config.init_weights == "bat" else MissLinear(info, config)


register_method(
    "miss", config=MissConfig, build=build_miss, peft_type="MISS",
    description="MiSS/Bone: one block shared by all input shards (ΔW[o,i] = D[i mod r, o]); 'bat': ΔW_ij = W_ij D_i + D_i.",
    paper="Kang & Yin 2024, arXiv:2409.15371",
    variants={"miss": {"r": 8}, "miss_mini": {"r": 8, "init_weights": "mini", "mini_r": 4},
              "miss_bat": {"r": 8, "init_weights": "bat"}},
)
