"""LoRA+ — "LoRA+: Efficient Low Rank Adaptation of Large Models", Hayou, Ghosh & Yu, ICML 2024, arXiv:2402.12354.

With Adam, LoRA's A and B learn at one rate, which the paper shows is inefficient at large width; LoRA+ sets
``η_B = λ · η_A`` (λ = ``loraplus_lr_ratio`` ≫ 1). Parameter groups, as the official code
(nikhil-ghosh-berkeley/loraplus ``create_loraplus_optimizer``) and PEFT's ``peft.optimizers.create_loraplus_optimizer``:

- A: every trainable 2-D parameter not named ``lora_B`` (lora_A, modules_to_save weights): lr ``η``;
- B: parameters named ``lora_B`` and every 1-D parameter (biases, DoRA magnitudes): lr ``λ·η``, weight decay
  except for biases and LayerNorm parameters (lr ``λ·η``, no decay);
- embeddings: the factors of an adapter on an embedding layer (its 1-D parameters, e.g. DoRA's magnitude, go
  with B, as in PEFT): lr ``loraplus_lr_embedding`` (absolute). Trainable token rows (``trainable_token_indices``)
  are not such an adapter: in group A, as in PEFT.

Weight decay is the run's ``weight_decay`` (the official code's ``optimizer_kwargs``; PEFT's
``loraplus_weight_decay`` is the same number under another name). The method's own parameter groups are
split the same way, each keeping its lr as ``η``. The optimizer is the loop's AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from ...core.config import check_positive, field_error
from ...core.model import adapter_layers
from .base import Procedure, ProcedureConfig, register_procedure


@dataclass
class LoraPlusConfig(ProcedureConfig):
    """``loraplus_lr_ratio``: λ = η_B / η_A, ≥ 1 (PEFT's name; 16 by default here, set it per task).
    ``loraplus_lr_embedding``: the learning rate of adapters on embedding layers (PEFT's default 1e-6)."""

    loraplus_lr_ratio: float = 16.0
    loraplus_lr_embedding: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.loraplus_lr_ratio >= 1.0:
            raise field_error(self, "loraplus_lr_ratio", f" must be >= 1 (η_B / η_A), got {self.loraplus_lr_ratio}.")
        check_positive(self, "loraplus_lr_embedding")


class LoraPlus(Procedure):
    config: LoraPlusConfig
    shares_batch = True  # only regroups its adapter's parameters

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # (trainable token rows, ``Delta.extra``, are no adapter on the embedding: PEFT leaves them in group A)
        embedding = {id(p) for _, layer in adapter_layers(model) if layer.info.kind == "embedding"
                     for delta in layer.adapters.values() if not delta.extra for p in delta.parameters() if p.ndim > 1}
        no_decay = {id(p) for m in model.modules() if isinstance(m, tuple(ALL_LAYERNORM_LAYERS))
                    for p in m.parameters(recurse=False)}
        no_decay |= {id(p) for n, p in model.named_parameters() if "bias" in n}
        names = {id(p): n for n, p in model.named_parameters()}
        ratio, out = self.config.loraplus_lr_ratio, []
        for group in groups:
            parts: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
            for p in group["params"]:
                if id(p) in embedding:
                    parts["embedding"].append(p)
                elif "lora_B" in names[id(p)] or p.ndim == 1:
                    parts["B_no_decay" if id(p) in no_decay else "B"].append(p)
                else:
                    parts["A"].append(p)
            settings = {"A": (group["lr"], group["weight_decay"]),
                        "embedding": (self.config.loraplus_lr_embedding, group["weight_decay"]),
                        "B": (group["lr"] * ratio, group["weight_decay"]), "B_no_decay": (group["lr"] * ratio, 0.0)}
            for part, params in parts.items():
                if params:
                    lr, decay = settings[part]
                    out.append({**group, "params": params, "lr": lr, "weight_decay": decay})
        return out


register_procedure(
    "loraplus", LoraPlus, config=LoraPlusConfig,
    description="LoRA+: B learns loraplus_lr_ratio times faster than A (embedding adapters at their own lr).",
    paper="Hayou et al. 2024 (ICML), arXiv:2402.12354",
)
