"""FedIT — "Towards Building the Federated GPT: Federated Instruction Tuning", Zhang et al., ICASSP 2024,
arXiv:2305.05644: FedAvg applied to LoRA factors separately,

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   global ΔW = s · B̄ Ā   (≠ Σ_k p_k s B_k A_k in general).

The baseline every federated LoRA engine ships (Flower's FlowerTune, OpenFedLLM); FLoRA and LoRA-FAIR measure
its aggregation error ``‖s·B̄Ā − Σ p_k s B_k A_k‖``. Clients continue from (Ā, B̄) each round. All clients use
one rank (averaging needs equal shapes).
"""

from __future__ import annotations

import torch

from .base import LoraStrategy, State, register_strategy


def weighted_mean(updates: list[State], weights: list[float]) -> State:
    """``Σ_k p_k · update_k`` name by name."""
    return {name: sum(w * u[name].float() for u, w in zip(updates, weights)) for name in updates[0]}


@register_strategy
class FedIT(LoraStrategy):
    name = "fedit"

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        return weighted_mean(updates, weights)


def fedit_error(updates: list[State], weights: list[float], scaling: float) -> dict[str, torch.Tensor]:
    """Per module ``s·B̄Ā − Σ_k p_k s B_k A_k`` (out, in): FedIT's aggregation error (FLoRA §3, LoRA-FAIR Ch. 1)."""
    mean = weighted_mean(updates, weights)
    out = {}
    for key in mean:
        if key.endswith(".lora_A"):
            path = key[: -len(".lora_A")]
            ideal = sum(w * u[path + ".lora_B"] @ u[key] for u, w in zip(updates, weights))
            out[path] = scaling * (mean[path + ".lora_B"] @ mean[key] - ideal)
    return out
