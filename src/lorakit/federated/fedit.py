"""FedIT — "Towards Building the Federated GPT: Federated Instruction Tuning", Zhang et al., ICASSP 2024,
arXiv:2305.05644: FedAvg applied to LoRA factors separately,

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   global ΔW = s · B̄ Ā   (≠ Σ_k p_k s B_k A_k in general).

The baseline every federated LoRA engine ships (Flower's FlowerTune, OpenFedLLM); FLoRA and LoRA-FAIR measure
its aggregation error ``‖s·B̄Ā − Σ p_k s B_k A_k‖``. Clients continue from (Ā, B̄) each round.

Heterogeneous ranks (``client_ranks``) by zero-padding, FLoRA's FedIT baseline for heterogeneous clients
(official ATP-1010/FederatedLLM ``fed_utils/model_aggregation.py``, ``zero_padding=True``, lines 94-116 at 7bea158:
``ZeroPad2d`` pads A_k (r_k, in) with rows and B_k (out, r_k) with columns up to r_max = max_k r_k, then the padded
factors are summed with weights p_k — the padded rows get no renormalisation). The global state has rank r_max; a
rank-r_k client continues from its leading block ``Ā[:r_k], B̄[:, :r_k]`` (the truncation of HetLoRA, Cho et al.
2024, arXiv:2401.06432). The official script's zero-padding path cannot be run as published, so it fixes no client
start: at 7bea158 its global model gets no LoRA (``main.py`` 200-222: ``get_peft_model`` only without zero-padding)
yet receives the padded factors through ``set_peft_model_state_dict``; earlier versions (0912cd3) ran it under
stacking, with a stacked adapter of rank ``lora_r · num_clients`` for weights of rank r_max. Averaging factors
presumes one scaling s = α/r for every client, so heterogeneous ranks need α ∝ r (``lora_alpha`` unset: α = 2r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import FIELD, ConfigError
from .base import LoraStrategy, State, lora_factors, register_strategy, write_factors


def weighted_mean(updates: list[State], weights: list[float]) -> State:
    """``Σ_k p_k · update_k`` name by name."""
    return {name: sum(w * u[name].float() for u, w in zip(updates, weights)) for name in updates[0]}


def zero_pad(update: State, rank: int) -> State:
    """``lora_A`` (r_k, in) padded with zero rows and ``lora_B`` (out, r_k) with zero columns to ``rank``."""
    out = {}
    for name, t in update.items():
        if name.endswith(".lora_A"):
            out[name] = F.pad(t.float(), (0, 0, 0, rank - t.shape[0]))
        elif name.endswith(".lora_B"):
            out[name] = F.pad(t.float(), (0, rank - t.shape[1]))
        else:
            out[name] = t.float()
    return out


def truncate(state: State, rank: int) -> State:
    """The leading rank-``rank`` block of a global state: ``A[:rank]``, ``B[:, :rank]``."""
    return {name: t[:rank] if name.endswith(".lora_A") else t[:, :rank] if name.endswith(".lora_B") else t
            for name, t in state.items()}


def state_rank(state: State) -> int:
    """The rank of the factors in ``state`` (0 for an empty state)."""
    return max((t.shape[0] for name, t in state.items() if name.endswith(".lora_A")), default=0)


@register_strategy
class FedIT(LoraStrategy):
    name = "fedit"
    heterogeneous_ranks = True

    @classmethod
    def check_config(cls, config) -> None:
        ranks = {config.rank_of(c) for c in range(config.clients)}
        if len(ranks) > 1 and config.lora_alpha is not None:
            raise ConfigError(f"strategy {config.strategy!r} averages the factors of clients with ranks {sorted(ranks)}, "
                              f"which presumes one scaling α/r for all; {FIELD}={config.lora_alpha} gives each rank "
                              "another. Leave lora_alpha unset (α = 2r), or use 'flora', which folds each client's "
                              "scaling into its stacked B.", field="FederatedConfig.lora_alpha")

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        rank = state_rank(state)
        return weighted_mean([zero_pad(u, rank) for u in updates], weights)

    @torch.no_grad()
    def client_start(self, model: nn.Module, received: State) -> None:
        """Continue from the leading block of the global factors that fits this client's rank."""
        rank = next(iter(lora_factors(model).values())).lora_A.weight.shape[0]
        write_factors(model, truncate(received, rank))


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
