"""LoRA-FAIR — "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement",
Bian, Wang, Zhang, Xu, ICCV 2025, arXiv:2411.14961.

The server averages the factors as FedIT does, then corrects the averaged B by a residual ΔB (paper Eq. 8):

    ΔB* = argmin_ΔB  S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖²,      ΔW = Σ_k p_k B_k A_k,   Ā = Σ p_k A_k,  B̄ = Σ p_k B_k

with S = 1 − cosine similarity, and broadcasts (Ā, B̄ + ΔB); clients continue from it (no re-initialisation,
base frozen). The objective follows the server code of the official repository (jmbian/LoRA-FAIR, server
``_optimize_delta_lora_B``, read through a public derived copy; the repository itself was not retrievable
here): cosine similarity taken column by column (``F.cosine_similarity(..., dim=0)``) and averaged, the
squared Frobenius norm of ΔB, summed over modules, plain SGD (lr 0.01), stopping early when the loss moves
less than 1e-6 for 5 steps. Two choices differ from that code and are deliberate: ΔB starts at 0 (the code
draws it Xavier-uniform; with the paper's λ = 0.01 that random start would barely decay and would add noise
of the size of B̄ to the broadcast B), and λ = 0.01 is the paper's value (the copy's default is 1.0). One rank
for all clients (the paper leaves heterogeneous ranks to future work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LoraStrategy, State, register_strategy
from .fedit import weighted_mean


def fair_objective(delta_B: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor, ideal: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """``(1 − mean_j cos(ΔW[:, j], ((B̄+ΔB)Ā)[:, j])) + λ‖ΔB‖_F²`` for one module (B̄ (out, r), Ā (r, in))."""
    recon = (B_bar + delta_B) @ A_bar  # (out, in)
    return (1 - F.cosine_similarity(ideal, recon, dim=0).mean()) + lam * delta_B.pow(2).sum()


def fair_correction(A_bar: dict[str, torch.Tensor], B_bar: dict[str, torch.Tensor], ideal: dict[str, torch.Tensor],
                    lam: float, lr: float, steps: int, patience: int = 5, tol: float = 1e-6) -> dict[str, torch.Tensor]:
    """ΔB per module by SGD on the summed objective (see the module docstring); keys are module paths."""
    deltas = {p: torch.zeros_like(B_bar[p], requires_grad=True) for p in B_bar}
    optimizer = torch.optim.SGD(list(deltas.values()), lr=lr)
    previous, calm = float("inf"), 0
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(fair_objective(deltas[p], B_bar[p], A_bar[p], ideal[p], lam) for p in deltas)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        calm = calm + 1 if abs(previous - value) < tol else 0
        if calm >= patience:
            break
        previous = value
    return {p: d.detach() for p, d in deltas.items()}


@register_strategy
class LoraFair(LoraStrategy):
    name = "lora_fair"

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        mean = weighted_mean(updates, weights)
        paths = [k[: -len(".lora_A")] for k in mean if k.endswith(".lora_A")]
        A_bar = {p: mean[p + ".lora_A"] for p in paths}
        B_bar = {p: mean[p + ".lora_B"] for p in paths}
        ideal = {p: sum(w * u[p + ".lora_B"].float() @ u[p + ".lora_A"].float() for u, w in zip(updates, weights))
                 for p in paths}
        with torch.enable_grad():
            delta = fair_correction(A_bar, B_bar, ideal, self.config.fair_lambda, self.config.fair_lr,
                                    self.config.fair_steps)
        self.last_correction = delta
        return {**mean, **{p + ".lora_B": B_bar[p] + delta[p] for p in paths}}
