"""FLoRA — "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
Wang et al., NeurIPS 2024, arXiv:2409.05976. Official code: github.com/ATP-1010/FederatedLLM
(``fed_utils/model_aggregation.py`` ``FedAvg(..., stacking=True)``, ``main.py``).

Stacking: client k trains a fresh rank-r_k LoRA (scaling s_k) and the server concatenates

    A = [p_1 A_1; p_2 A_2; …; p_K A_K]   (Σ r_k, in)      B = [s_1 B_1, s_2 B_2, …, s_K B_K]   (out, Σ r_k)

so that ``B A = Σ_k p_k s_k B_k A_k`` exactly — the mean of the client ΔWs with no cross terms, whatever the
ranks (the paper's stacking equation). The official code scales A_k by p_k, concatenates B_k unscaled and keeps
the clients' s = α/r = 2 on the stacked adapter; folding s_k into B here is the same product and also allows
clients with different α/r. The stacked LoRA is merged into the global base (``merge_and_unload`` in
``main.py``) and the next round's clients start a new LoRA (A random, B = 0) on that base.

On the wire: the global state is the stack of every round's stacked factors (``<path>.stack_A`` (R, in),
``<path>.stack_B`` (out, R)); each client rebuilds its base as ``W0 + stack_B · stack_A``, so clients keep no
state between rounds and a client sampled late is as current as any. The downlink grows by Σ r_k (in + out)
values per module per round (FLoRA's own downlink is the stacked adapter of the round); the uplink is a plain
rank-r_k LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.model import adapter_layers
from ..core.delta import oriented_weight
from .base import LoraStrategy, State, read_factors, register_strategy


def stack(updates: list[State], weights: list[float], scalings: list[float]) -> State:
    """One round's stacked factors: ``{"<path>.stack_A": [p_k A_k]_k, "<path>.stack_B": [s_k B_k]_k}``."""
    out = {}
    for key in updates[0]:
        if key.endswith(".lora_A"):
            path = key[: -len(".lora_A")]
            out[f"{path}.stack_A"] = torch.cat([w * u[key].float() for u, w in zip(updates, weights)], dim=0)
            out[f"{path}.stack_B"] = torch.cat([s * u[path + ".lora_B"].float() for u, s in zip(updates, scalings)],
                                               dim=1)
    return out


@register_strategy
class FLoRA(LoraStrategy):
    name = "flora"
    heterogeneous_ranks = True

    def initial_state(self, factors: State, scaling: dict[str, float]) -> State:
        # Nothing merged yet: empty stacks (rank 0) for every adapted module.
        return {**{f"{k[:-7]}.stack_A": v.new_zeros(0, v.shape[1]) for k, v in factors.items() if k.endswith(".lora_A")},
                **{f"{k[:-7]}.stack_B": v.new_zeros(v.shape[0], 0) for k, v in factors.items() if k.endswith(".lora_B")}}

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        new = stack(updates, weights, scalings)
        return {k: torch.cat([state[k], new[k]], dim=0 if k.endswith("stack_A") else 1) for k in state}

    def global_lora(self, state: State, scaling: float) -> tuple[State, float]:
        """The stacks of every round as one LoRA of rank Σ r_k (over rounds), scaling 1 (s_k is folded into B)."""
        return {k.replace(".stack_A", ".lora_A").replace(".stack_B", ".lora_B"): v for k, v in state.items()}, 1.0

    @torch.no_grad()
    def client_start(self, model: nn.Module, received: State) -> None:
        """Merge the global stacks into the (pristine) base weights; the fresh adapter stays as initialised."""
        delta = self.global_delta(received, 1.0)
        for path, layer in adapter_layers(model):
            if path in delta and delta[path].numel():
                w = oriented_weight(layer.base_layer, layer.info)  # (out, in) view of the stored weight
                w.add_(delta[path].to(w.dtype))

    def client_update(self, model: nn.Module) -> State:
        return read_factors(model)
