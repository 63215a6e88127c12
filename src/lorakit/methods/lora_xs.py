"""LoRA-XS — "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters", Bałazy et al.,
arXiv:2405.17604.

``y = W x + s · B R A dropout(x)`` with ``B A`` the truncated SVD of the frozen base weight and only the r×r
``R`` trained (r² parameters per layer, independent of the layer's width):

    W = U Σ Vᵀ,   B = U[:, :r]  (out, r),   A = Σ[:r] V[:, :r]ᵀ  (r, in),   R ~ N(0, σ²), σ = 1e-5.

Follows the official code, ``MohammadrezaBanaei/LoRA-XS`` ``utils/initialization_utils.py``:
``get_svd_replacement_module`` runs ``torch.linalg.svd`` on ``Wᵀ`` (in, out), multiplies the left factor by
``diag(S)`` and keeps the top r (``retain_part: top``, ``config/loraxs_config.yaml``) — which is the A and B
above — and ``find_and_initialize`` sets the latent ``nn.Linear(r, r)`` to N(0, 1e-5) (``init_module_weights``),
freezing A and B (``requires_grad = False``). Forward as ``latent_utils.forward_latent``:
``lora_B(R(lora_A(dropout(x)))) · scaling``, ``scaling = α / r``. Since R starts at N(0, 1e-10), ΔW is tiny
but not zero at step 0 (as in the official code); ``init_R_std=0`` gives an exact zero start.

A and B are frozen through ``frozen_names`` and saved with the adapter (so loading never redoes the SVD).
Export: ``ΔW = s·B (R A)`` is a rank-r LoRA; ``to_lora`` writes ``lora_A = R A``, ``lora_B = B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.delta import LayerInfo, oriented_weight
from ..core.config import check_non_negative
from ..core.registry import register_method
from .nlora import MiddleConfig, MiddleLinear, middle_to_lora


@dataclass
class LoraXSConfig(MiddleConfig):
    """LoRA-XS fields.

    - ``r``: size of R (r² trained parameters per layer). ``lora_alpha``: scaling numerator (alpha / r).
    - ``lora_dropout``: dropout on the adapter's input during training, in [0, 1).
    - ``init_R_std``: σ of R's normal init (official 1e-5; 0 = exact zero start).
    """

    init_R_std: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "init_R_std", finite=True)


@torch.no_grad()
def svd_init(delta: MiddleLinear, weight: torch.Tensor, std: float) -> None:
    """``B = U_r``, ``A = Σ_r V_rᵀ`` from the SVD of ``weight`` (out, in); ``R ~ N(0, std²)``."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    r = delta.r
    delta.lora_B.weight.copy_(U[:, :r])
    delta.lora_A.weight.copy_(S[:r, None] * Vh[:r])
    nn.init.normal_(delta.middle.weight, mean=0.0, std=std)


def build_lora_xs(base_layer: nn.Module, info: LayerInfo, config: LoraXSConfig, path: str = "") -> MiddleLinear:
    delta = MiddleLinear(info, config, middle_name="lora_R", frozen=("lora_A", "lora_B"))
    svd_init(delta, oriented_weight(base_layer, info), config.init_R_std)
    return delta


register_method(
    "lora_xs", config=LoraXSConfig, build=build_lora_xs, to_lora=middle_to_lora, zero_init=False,
    description="s·B R A with B, A frozen from the truncated SVD of W; only the r×r R trains (r² params/layer).",
    paper="Bałazy et al. 2024, arXiv:2405.17604",
    variants={"lora_xs": {}, "lora_xs_zero": {"init_R_std": 0.0}},
)
