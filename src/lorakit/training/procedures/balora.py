"""BA-LoRA — "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language
Models", Chang et al., arXiv:2408.04556.

Three regularisers added to the task loss of a causal LM (the paper's NLG form):

    L = L_task + λ1·KL(p_base ‖ p_ft) + λ2·(−H(p_ft)) + λ3·(−mean_b Σ_{j≤k} σ_j(Z_b) / Σ_j σ_j(Z_b))

p = softmax(logits); KL as ``kl_div(log p_ft, p_base, reduction="batchmean")`` (sum / batch size); H the token
entropy averaged over positions; Z_b the (seq × vocab) logits of example b, σ its singular values.

Follows the official code, cyp-jlu-ai/BA-LoRA ``train.py`` (``CustomTrainer.compute_loss``, ``task_type="nlg"``
branch; ``svd_regularization``; defaults λ1 = 1e-4, λ2 = 3e-4, λ3 = 1e-4, k = 3), except:

- p_base comes from the same model with its adapters disabled (``lorakit.disable_adapters``, no gradient), not a
  second model copy: the same frozen base, without its memory;
- the official SVD term flattens the batch to one (B, T·V) matrix, indexes ``s[:, :k]`` on a 1-D tensor (an
  error) and runs under ``no_grad`` (no gradient); here it is per example on (T × V) and differentiable, as the
  paper describes it;
- like the official code, every position (padding included) counts; the LoRA init (the official scripts use
  PiSSA) is the adapter config's choice (``init_lora_weights="pissa"``).

The inputs and logits reach ``extra_loss`` through hooks on the model and its output layer (the registry's
``extra_loss`` gets no batch); the base pass costs one extra no-grad forward per micro-batch, as the official
frozen copy does. Works in lorakit's loop and under HF Trainer (the callback adds procedure losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_non_negative, check_positive_ints
from ...core.errors import ConfigError
from ...core.model import disable_adapters
from .base import Procedure, ProcedureConfig, register_procedure


@dataclass
class BaLoraConfig(ProcedureConfig):
    """``lambda1`` consistency (KL to the base), ``lambda2`` diversity (negative entropy), ``lambda3`` SVD
    (top-``k`` singular-value share of the logits); the official defaults."""

    lambda1: float = 1e-4
    lambda2: float = 3e-4
    lambda3: float = 1e-4
    k: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "lambda1", "lambda2", "lambda3")
        check_positive_ints(self, "k")


def balora_terms(logits: torch.Tensor, base_logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The three regularisers from (B, T, V) logits of the adapted and the base model."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    p_base = F.softmax(base_logits.float(), dim=-1)
    consistency = F.kl_div(log_p, p_base, reduction="batchmean")
    p = log_p.exp()
    diversity = (p * log_p).sum(dim=-1).mean()  # −H(p)
    s = torch.linalg.svdvals(logits.float())  # (B, min(T, V))
    svd = -(s[:, :k].sum(dim=1) / (s.sum(dim=1) + 1e-10)).mean()
    return {"consistency": consistency, "diversity": diversity, "svd": svd}


class BaLora(Procedure):
    config: BaLoraConfig

    def __init__(self, config: BaLoraConfig, train_config) -> None:
        super().__init__(config, train_config)
        self._hooks: list[Any] = []
        self._last: tuple[dict[str, Any], torch.Tensor] | None = None
        self._in_base_pass = False

    @classmethod
    def check_adapter_config(cls, config: BaLoraConfig, adapter_config: Any, task_type: str = "causal-lm") -> None:
        """Its regularisers read the LM head's logits (``param_groups`` hooks ``get_output_embeddings``), which a
        sequence classifier does not have."""
        if task_type != "causal-lm":
            raise ConfigError(f"BA-LoRA needs a causal LM with an output layer (its regularisers read the next-token "
                              f"logits); --task-type {task_type} trains a classifier head instead. Train it as a "
                              "causal LM, or drop --procedure balora.")

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Inputs from a pre-hook on the model, logits from the output layer: both are seen before the model's
        # forward returns, so a wrapper around forward (lorakit's Trainer callback) can add the loss too.
        inputs: dict[str, Any] = {}

        def remember_inputs(module, args, kwargs):
            if not self._in_base_pass:
                inputs.clear()
                inputs.update({k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")})

        def remember_logits(module, args, output):
            if not self._in_base_pass and model.training and torch.is_grad_enabled():
                self._last = (dict(inputs), output)

        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"BA-LoRA needs a causal LM with an output layer; {type(model).__name__} has none.")
        self._hooks.append(model.register_forward_pre_hook(remember_inputs, with_kwargs=True))
        self._hooks.append(head.register_forward_hook(remember_logits))
        return groups

    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        if self._last is None:
            return None
        inputs, logits = self._last
        self._last = None
        self._in_base_pass = True
        try:
            with torch.no_grad(), disable_adapters(model):
                base_logits = model(**inputs).logits
        finally:
            self._in_base_pass = False
        terms = balora_terms(logits, base_logits, self.config.k)
        return (self.config.lambda1 * terms["consistency"] + self.config.lambda2 * terms["diversity"]
                + self.config.lambda3 * terms["svd"])

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


register_procedure(
    "balora", BaLora, config=BaLoraConfig,
    description="BA-LoRA: KL to the adapters-disabled base, entropy and top-k singular-value regularisers.",
    paper="Chang et al. 2024, arXiv:2408.04556",
)
