"""SLoRA, NLoRA and IntTune — "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models",
Guo et al., arXiv:2502.14482.

One structure, three matrices: ``y = W x + s · B N A dropout(x)``, ``A ∈ R^{r×in}``, ``N ∈ R^{r×r}``,
``B ∈ R^{out×r}``, ``s = α / r``.

- **SLoRA** (structured LoRA): A and N Kaiming-uniform (a=√5), B = 0 ⇒ ΔW = 0 at init; all three train.
- **NLoRA** (Nyström init): ``A = W[:r, :]``, ``B = W[:, :r]``, ``N = W[:r, :r]`` copied from the frozen base
  (W as (out, in)); all three train.
- **IntTune**: NLoRA's init, A and B frozen (``frozen_names``), only the r×r N trains.

Follows the official code, ``TracyGuo2001/NLoRA`` ``code/peft/src/peft/tuners/lora/layer.py`` (``nlora_init``,
``slora_init``, ``get_delta_weight``: ``B @ N @ A * scaling``) and ``code/inttune.py``. Two choices, both the
official code's:

- *Nyström form*: the middle is ``N = W[:r, :r]`` itself, not the textbook ``W[:r, :r]⁺`` (the pseudo-inverse
  only appears commented out in ``nlora_init``). So ``B N A`` is not the Nyström approximation of W.
- *No base correction*: W is left as it is, so NLoRA/IntTune change the model at step 0 (ΔW = s·W[:, :r]
  W[:r, :r] W[:r, :] ≠ 0; the contract's zero-init check is off for them). Subtracting it from W would make
  the adapter depend on a modified base, which the official code does not do.

Export: ``ΔW = s·B (N A)`` is a rank-r LoRA with ``lora_A = N A``; ``to_lora`` writes exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from ..core.config import AdapterConfig, check_positive_ints, field_error
from ..core.delta import Delta, LayerInfo, RankUnits, oriented_weight
from ..core.errors import ConfigError, did_you_mean
from ..core.inits import find_init, list_inits
from ..core.model import adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora


@dataclass
class MiddleConfig(AdapterConfig):
    """Shared fields of the ``B M A`` methods (M = a trained r×r middle matrix).

    - ``r``: size of the middle matrix (rank of ΔW). ``lora_alpha``: scaling numerator (scaling alpha / r).
    - ``lora_dropout``: dropout on the adapter's input during training, in [0, 1).
    - ``init_weights``: a registered init run after attaching (``lora_sb`` on LoRA-XS, ``nlora``); None: the
      method's own init.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        if self.init_weights is not None and find_init(self.init_weights) is None:
            names = [i.name for i in list_inits()]
            raise field_error(self, "init_weights", f"={self.init_weights!r} is not a registered init "
                              f"({', '.join(i.spellings for i in list_inits())}).{did_you_mean(str(self.init_weights), names)}")

    def requested_init(self) -> str | None:
        return self.init_weights

    def with_init(self, init: str) -> "MiddleConfig":
        return replace(self, init_weights=init)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class SloraConfig(MiddleConfig):
    pass


@dataclass
class NloraConfig(MiddleConfig):
    pass


@dataclass
class InttuneConfig(MiddleConfig):
    pass


class MiddleLinear(Delta):
    """``Δ(x) = s · B M A dropout(x)``; the middle matrix is registered under ``middle_name`` (NLoRA's
    ``lora_N``, LoRA-XS's ``lora_R``); ``frozen`` lists the factors that never train."""

    def __init__(self, info: LayerInfo, config: MiddleConfig, middle_name: str = "lora_N",
                 frozen: tuple[str, ...] = ()):
        super().__init__(info)
        if config.r > min(info.in_features, info.out_features):
            raise ConfigError(f"{type(config).__name__}.r={config.r} exceeds the layer's size "
                              f"({info.out_features}×{info.in_features}); choose r <= {min(info.in_features, info.out_features)}.")
        self.r = config.r
        self.scaling = config.scaling
        self.middle_name = middle_name
        self.frozen = frozen
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(info.in_features, config.r, bias=False)
        self.add_module(middle_name, nn.Linear(config.r, config.r, bias=False))
        self.lora_B = nn.Linear(config.r, info.out_features, bias=False)

    @property
    def middle(self) -> nn.Linear:
        return getattr(self, self.middle_name)

    def frozen_names(self) -> Iterable[str]:
        return tuple(f"{m}.weight" for m in self.frozen)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return (self.lora_B(self.middle(self.lora_A(self.lora_dropout(x)))) * self.scaling).to(base_out.dtype)

    def folded_A(self) -> torch.Tensor:
        """``M A`` (r, in) in float32: the LoRA ``lora_A`` with the same ΔW."""
        return self.middle.weight.float() @ self.lora_A.weight.float()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.folded_A()) * self.scaling  # (out, r) @ (r, in)

    def units(self) -> RankUnits:
        return RankUnits(A=self.middle.weight @ self.lora_A.weight, B=self.lora_B.weight, scaling=self.scaling)


def slora_init(delta: MiddleLinear) -> None:
    """layer.py ``slora_init``: A, N Kaiming-uniform(a=√5), B = 0."""
    nn.init.kaiming_uniform_(delta.lora_A.weight, a=math.sqrt(5))
    nn.init.kaiming_uniform_(delta.middle.weight, a=math.sqrt(5))
    nn.init.zeros_(delta.lora_B.weight)


@torch.no_grad()
def nystrom_init(delta: MiddleLinear, weight: torch.Tensor) -> None:
    """layer.py ``nlora_init``: ``A = W[:r, :]``, ``N = W[:r, :r]``, ``B = W[:, :r]`` (W as (out, in))."""
    r = delta.r
    delta.lora_A.weight.copy_(weight[:r, :])
    delta.middle.weight.copy_(weight[:r, :r])
    delta.lora_B.weight.copy_(weight[:, :r])


def build_slora(base_layer: nn.Module, info: LayerInfo, config: SloraConfig, path: str = "") -> MiddleLinear:
    delta = MiddleLinear(info, config)
    slora_init(delta)
    return delta


def build_nlora(base_layer: nn.Module, info: LayerInfo, config: NloraConfig, path: str = "") -> MiddleLinear:
    delta = MiddleLinear(info, config)
    nystrom_init(delta, oriented_weight(base_layer, info).float())
    return delta


def build_inttune(base_layer: nn.Module, info: LayerInfo, config: InttuneConfig, path: str = "") -> MiddleLinear:
    delta = MiddleLinear(info, config, frozen=("lora_A", "lora_B"))
    nystrom_init(delta, oriented_weight(base_layer, info).float())
    return delta


def middle_to_lora(model: nn.Module, name: str):
    """``to_lora`` for every ``B M A`` method: ``lora_A = M A``, ``lora_B = B``, same r and α."""
    config = adapter_state(model).configs[name]
    return export_plain_lora(model, name, lambda d: (d.folded_A().to(d.lora_A.weight.dtype), d.lora_B.weight),
                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


PAPER = "Guo et al. 2025, arXiv:2502.14482"
register_method(
    "slora", config=SloraConfig, build=build_slora, to_lora=middle_to_lora, paper=PAPER,
    description="Structured LoRA: s·B N A with a trained r×r middle N (A, N Kaiming, B = 0).",
    variants={"slora": {}},
)
register_method(
    "nlora", config=NloraConfig, build=build_nlora, to_lora=middle_to_lora, paper=PAPER, zero_init=False,
    description="Nyström-initialised SLoRA: A = W[:r,:], N = W[:r,:r], B = W[:,:r] (official: no base correction).",
    variants={"nlora": {"lora_alpha": 8}},
)
register_method(
    "inttune", config=InttuneConfig, build=build_inttune, to_lora=middle_to_lora, paper=PAPER, zero_init=False,
    description="IntTune: NLoRA's init with A and B frozen; only the r×r middle N trains.",
    variants={"inttune": {"lora_alpha": 8}},
)
