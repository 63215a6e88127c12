"""FFA-LoRA on the wire — "Improving LoRA in Privacy-preserving Federated Learning", Sun, Li, Li, Ding,
ICLR 2024, arXiv:2403.12313.

Every client builds the ``ffa_lora`` method (``lorakit.methods.ffa_lora``: A frozen at its random init, B = 0)
from the same seed, so all clients and the server hold the same A without sending it; only B travels, both ways:

    B̄ = Σ_k p_k B_k,   global ΔW = s · B̄ A   (= Σ_k p_k s B_k A exactly: ΔW is linear in B).

Half the traffic of FedIT on square layers (B is out×r, A is r×in). No official code exists (see the method
file); this follows the paper. The server checks each client's A against its own through a checksum sent in
the round config, so a client that drew a different A is refused rather than averaged silently.
"""

from __future__ import annotations

from torch import nn

from .base import LoraStrategy, State, read_factors, register_strategy, write_factors
from .fedit import weighted_mean


@register_strategy
class FfaLora(LoraStrategy):
    name = "ffa"
    method = "ffa_lora"

    def initial_state(self, factors: State, scaling: dict[str, float]) -> State:
        self.frozen_A = {k: v for k, v in factors.items() if k.endswith(".lora_A")}  # the server's copy of A
        return {k: v for k, v in factors.items() if k.endswith(".lora_B")}

    def expected_update(self, state, rank, shapes):
        return {f"{p}.lora_B": (o, rank) for p, (o, i) in shapes.items()}

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        return weighted_mean(updates, weights)

    def global_lora(self, state: State, scaling: float) -> tuple[State, float]:
        return {**state, **self.frozen_A}, scaling

    def client_start(self, model: nn.Module, received: State) -> None:
        write_factors(model, received)  # B only; A is the seeded one the client built

    def client_update(self, model: nn.Module) -> State:
        return read_factors(model, ("lora_B",))


def a_checksum(factors: State) -> float:
    """A cheap fingerprint of the frozen A matrices (sum of |A| in float64), compared by server and clients."""
    return float(sum(v.double().abs().sum() for k, v in sorted(factors.items()) if k.endswith(".lora_A")))
