"""NOLA — "NOLA: Compressing LoRA using Linear Combination of Random Basis", Koohpayegani et al., arXiv:2310.02556.

LoRA's factors are rebuilt at every step from frozen random bases; only the mixing coefficients train:

    A = A₀ + Σ_{i=1..k} α_i A_i   (r, in),    B = Σ_{j=1..l} β_j B_j   (out, r),    Δ(x) = s · B A dropout(x),

``s = lora_alpha / r``, ``A_i, B_j ~ U(-1, 1) / √(num_basis)``, α = β = 0 at init ⇒ ΔW = 0 (and β gets a gradient
through A₀). Trained parameters per layer: ``num_basis_A + num_basis_B`` (independent of the layer's width).

Follows the official code, ``UCDvision/NOLA`` ``gpt/src/model_nola.py``: ``GenerateParams.forward`` draws the
basis tensor (num_basis, out, in) with ``nn.init.uniform_(W, -1, 1)`` after seeding, scales it by
``1/√num_basis`` and mixes ``einsum('b,boi->oi', coefficients, W)``; ``NOLALinear.forward`` adds that to the layer's
own frozen weight, which ``LoRA.reset_lora_parameters`` sets to Kaiming-uniform(a=√5) for lora_A (= A₀) and zeros
for lora_B (B₀ = 0). The paper writes A and B as pure basis sums; the A₀ term is the code's and is kept.
Differences, by design: the official code stores a random per-module seed as a frozen parameter; lorakit derives
it from ``projection_seed`` and the module path (CRC32), so nothing but the coefficients is saved — the bases and A₀
are non-persistent buffers regenerated on build (memory: ``num_basis·r·(in+out)`` floats per layer while loaded;
the official on-the-fly ``autograd.Function`` trades that for regenerating them every forward and backward).

File size: only the coefficients are saved. Measured in tests/methods/test_nola.py (tiny Llama, q/v/down in 2
layers, r=8, k=l=32): 384 floats, a 2,984-byte file, vs LoRA r=8's 3,328 floats, 14,848 bytes (≈ 5× smaller; the
ratio grows with width: at d=4096, r=8, k=l=1024 a square layer is 2,048 vs 65,536 floats, 32×).
Export: ``to_lora`` materialises A and B as a plain PEFT LoRA with the same r and α.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig, check_non_negative, check_positive_ints
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.registry import register_method
from ._plain import export_plain_lora


@dataclass
class NolaConfig(AdapterConfig):
    """``r``/``lora_alpha``: the materialised LoRA's rank and α (s = α/r); ``num_basis_A``/``num_basis_B``: k and l,
    the trained coefficients per layer; ``projection_seed``: seeds every layer's bases (with its module path);
    ``lora_dropout``: dropout on the layer input before the update."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    num_basis_A: int = 1024
    num_basis_B: int = 1024
    projection_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r", "num_basis_A", "num_basis_B")
        check_non_negative(self, "projection_seed")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def module_seed(projection_seed: int, path: str) -> int:
    """The seed of one module's bases: stable across runs and machines (CRC32 of the module path)."""
    return (projection_seed * 1_000_003 + zlib.crc32(path.encode())) % (2**31)


def random_basis(seed: int, num_basis: int, rows: int, cols: int) -> torch.Tensor:
    """(num_basis, rows, cols) ~ U(-1, 1) / √num_basis, as the official ``GenerateParams.forward``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(num_basis, rows, cols).uniform_(-1.0, 1.0, generator=gen) / math.sqrt(num_basis)


class NolaLinear(Delta):
    """Trained: ``nola_alpha`` (k,), ``nola_beta`` (l,). Regenerated (never saved): ``basis_A`` (k, r, in),
    ``basis_B`` (l, out, r), ``lora_A0`` (r, in)."""

    plain_units = True

    def __init__(self, info: LayerInfo, config: NolaConfig, seed: int):
        super().__init__(info)
        self.r, self.scaling = config.r, config.scaling
        self.register_buffer("basis_A", random_basis(seed, config.num_basis_A, config.r, info.in_features),
                             persistent=False)
        self.register_buffer("basis_B", random_basis(seed + 1, config.num_basis_B, info.out_features, config.r),
                             persistent=False)
        a0 = torch.empty(config.r, info.in_features)
        nn.init.kaiming_uniform_(a0, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed + 2))
        self.register_buffer("lora_A0", a0, persistent=False)
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_A))  # (k,)
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B))  # (l,)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def lora_A(self) -> torch.Tensor:
        return self.lora_A0 + torch.einsum("b,boi->oi", self.nola_alpha, self.basis_A)  # (r, in)

    def lora_B(self) -> torch.Tensor:
        return torch.einsum("b,boi->oi", self.nola_beta, self.basis_B)  # (out, r)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        A, B = self.lora_A(), self.lora_B()
        h = self.lora_dropout(x.to(A.dtype)) @ A.T  # (..., r)
        return (h @ B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B().float() @ self.lora_A().float() * self.scaling  # (out, in)

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_A(), B=self.lora_B(), scaling=self.scaling, dropout=self.lora_dropout)


def build_nola(base_layer: nn.Module, info: LayerInfo, config: NolaConfig, path: str = "") -> NolaLinear:
    return NolaLinear(info, config, module_seed(config.projection_seed, path))


def nola_to_lora(model: nn.Module, name: str):
    """A plain PEFT LoRA with the materialised ``lora_A = A`` (r, in), ``lora_B = B`` (out, r), same r and α."""
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    return export_plain_lora(model, name, lambda d: (d.lora_A().detach(), d.lora_B().detach()),
                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "nola", config=NolaConfig, build=build_nola, to_lora=nola_to_lora,
    description="LoRA factors as seeded random-basis combinations (A = A₀ + Σα_i A_i, B = Σβ_j B_j); only α, β train.",
    paper="Koohpayegani et al. 2023, arXiv:2310.02556",
    variants={"nola": {"r": 4, "num_basis_A": 16, "num_basis_B": 16}},
)
