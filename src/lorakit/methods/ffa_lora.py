"""FFA-LoRA — "Improving LoRA in Privacy-preserving Federated Learning", Sun, Li, Li, Ding, ICLR 2024,
arXiv:2403.12313.

Plain LoRA ``y = W x + s · B A dropout(x)`` with ``A`` frozen at its random init and only the zero-initialised
``B`` trained (and, federated, communicated: half the traffic; averaging B alone is exact because ΔW is linear
in B).

No official code was released (the reference notes list none; a community Flower port exists). This follows
the paper: A drawn as PEFT's LoRA draws it (Kaiming-uniform, a=√5), B = 0, A excluded from training through
``frozen_names`` — so the delta, the file keys and the export are exactly a PEFT LoRA's. The paper notes that
with A fixed, scaling α only rescales B's learning rate (its Theorem: tuning α ≡ tuning lr), so α keeps
LoRA's meaning here and a larger learning rate than LoRA's may be needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from ..core.delta import LayerInfo
from ..core.config import field_error
from ..core.model import adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora
from .lora import LoraConfig, LoraLinear


@dataclass
class FfaLoraConfig(LoraConfig):
    """LoRA's fields; ``use_dora``/``lora_bias`` are refused (they would add trained tensors besides B)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise field_error(self, name, " is not part of FFA-LoRA (only B trains); set it False.")
        if self.init_lora_weights in (False, "orthogonal", "mica"):
            raise field_error(self, "init_lora_weights", f"={self.init_lora_weights!r} would leave B non-zero or A "
                                                         "zero; FFA-LoRA needs B = 0 and a random A (True or "
                                                         "'gaussian').")


class FfaLoraLinear(LoraLinear):
    """A LoRA whose ``lora_A`` never trains."""

    def frozen_names(self) -> Iterable[str]:
        return ("lora_A.weight",)


def build_ffa_lora(base_layer: nn.Module, info: LayerInfo, config: FfaLoraConfig, path: str = "") -> FfaLoraLinear:
    return FfaLoraLinear(info, config)


def ffa_to_lora(model: nn.Module, name: str):
    config = adapter_state(model).configs[name]
    return export_plain_lora(model, name, lambda d: (d.lora_A.weight, d.lora_B.weight * (d.scaling * d.r / config.lora_alpha)),
                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "ffa_lora", config=FfaLoraConfig, build=build_ffa_lora, to_lora=ffa_to_lora,
    description="LoRA with A frozen at its random init; only B (zero-init) trains — half the federated traffic.",
    paper="Sun et al. 2024 (ICLR), arXiv:2403.12313",
    variants={"ffa_lora": {}},
)
