"""S2-LoRA — "Sparsely Shared LoRA on Whisper for Child Speech Recognition", Liu, Qin, Peng & Lee,
arXiv:2309.11756.

The two low-rank matrices are shared; each adapted weight matrix keeps only its own rank-coefficient vector λ_m,
pushed to sparsity by an L1 penalty:

    Δ_m(x) = s · B diag(λ_m) A dropout(x),   s = lora_alpha / r,
    loss  += l1_lambda · Σ_m ‖λ_m‖₁,

``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` shared by every targeted layer of the same shape (one pair per shape group:
"globally shared" needs equal shapes), ``λ_m ∈ R^r`` per module. Trainable parameters: one (A, B) per shape
group plus r per module — far below LoRA r=1 on a deep model.

No official code was found (searched GitHub and the paper's pages; shared/reference/methods-lora-variants.md §6
agrees), so this follows the paper's abstract and its stated design source, AdaLoRA's learnable rank coefficient
(the paper: "we compare LoRA and AdaLoRA and figure out the learnable rank coefficient is a good design"), with
AdaLoRA's initialisation as PEFT ships it (``peft/tuners/adalora/layer.py`` ``reset_lora_parameters``: A, B ~
N(0, 0.02²), the coefficients E = 0 ⇒ ΔW = 0 at init, and the coefficients get the first gradient). Choices where the
abstract is silent, each marked as ours: sharing per shape group, the penalty as a plain sum over all coefficients
(``l1_lambda``), no AdaLoRA orthogonality term. ``rank_distribution`` reports the learned non-negligible ranks per
module (the paper compares this pattern with AdaLoRA's). Export: ``to_lora`` writes ``lora_A = diag(λ_m) A``,
``lora_B = B`` per module, a plain PEFT LoRA with the same ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig, check_non_negative, check_positive, check_positive_ints
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.model import adapter_layers, adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora
from ._shared import group_layout, place, prepare_shared, shared_params


@dataclass
class S2LoraConfig(AdapterConfig):
    """S2-LoRA fields.

    - ``r``: rank of the shared A, B; ``lora_alpha``: s = lora_alpha / r.
    - ``l1_lambda``: weight of the sparsity penalty ``l1_lambda · Σ_m ‖λ_m‖₁`` added to the loss (0 turns it off).
    - ``init_std``: std of the shared A, B at init (AdaLoRA's 0.02).
    - ``lora_dropout``: dropout on the layer input before the update.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    l1_lambda: float = 1e-3
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        check_non_negative(self, "l1_lambda", finite=True)
        check_positive(self, "init_std", finite=True)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class S2LoraLinear(Delta):
    """Shared ``lora_A`` (r, in) and ``lora_B`` (out, r) (registered on the shape group's first module only) and
    this module's ``lora_lambda`` (r,)."""

    plain_units = True

    def __init__(self, info: LayerInfo, config: S2LoraConfig, shared: dict[str, nn.Parameter], owner: bool):
        super().__init__(info)
        self.r, self.scaling = config.r, config.scaling
        self.shared = shared  # a plain dict: the same Parameters for every module of the shape group
        if owner:
            self.lora_A, self.lora_B = shared["A"], shared["B"]
        self.lora_lambda = nn.Parameter(torch.zeros(config.r))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        A, B = self.shared["A"], self.shared["B"]
        h = (self.lora_dropout(x.to(A.dtype)) @ A.T) * self.lora_lambda  # (..., r)
        return (h @ B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.shared["A"].float(), self.shared["B"].float()
        return (B * self.lora_lambda.float()) @ A * self.scaling  # (out, in)

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_lambda[:, None] * self.shared["A"], B=self.shared["B"], scaling=self.scaling,
                         dropout=self.lora_dropout)


def prepare_s2lora(model: nn.Module, config: S2LoraConfig) -> S2LoraConfig:
    """One shared (A, B) per (in, out) shape among the targets."""
    return prepare_shared(config, group_layout(model, config, lambda path, i: (i.in_features, i.out_features)))


def build_s2lora(base_layer: nn.Module, info: LayerInfo, config: S2LoraConfig, path: str = "") -> S2LoraLinear:
    key, _, _ = place(config, path)

    def make() -> dict[str, nn.Parameter]:
        return {"A": nn.Parameter(torch.randn(config.r, info.in_features) * config.init_std),
                "B": nn.Parameter(torch.randn(info.out_features, config.r) * config.init_std)}

    shared, owner = shared_params(config, key, make)
    return S2LoraLinear(info, config, shared, owner)


def _deltas(model: nn.Module, name: str) -> list[tuple[str, S2LoraLinear]]:
    return [(path, layer.adapters[name]) for path, layer in adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], S2LoraLinear)]


def s2lora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """``l1_lambda · Σ_m ‖λ_m‖₁`` over the adapter's modules."""
    weight = adapter_state(model).configs[name].l1_lambda
    return weight * sum(d.lora_lambda.abs().sum() for _, d in _deltas(model, name))


def rank_distribution(model: nn.Module, name: str, threshold: float = 1e-3) -> dict[str, int]:
    """Per module, how many coefficients have ``|λ| > threshold · max|λ|`` over the adapter (the learned ranks)."""
    deltas = _deltas(model, name)
    top = max(float(d.lora_lambda.detach().abs().max()) for _, d in deltas) or 1.0
    return {path: int((d.lora_lambda.detach().abs() > threshold * top).sum()) for path, d in deltas}


def s2lora_to_lora(model: nn.Module, name: str):
    """A plain PEFT LoRA per module: ``lora_A = diag(λ_m) A`` (r, in), ``lora_B = B`` (out, r), same r and α."""
    config = adapter_state(model).configs[name]
    # every module gets its own copy of the shared B: PEFT files hold one tensor per module
    return export_plain_lora(model, name, lambda d: (d.units().A.detach(), d.shared["B"].detach().clone()),
                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "s2lora", config=S2LoraConfig, build=build_s2lora, prepare=prepare_s2lora, extra_loss=s2lora_extra_loss,
    to_lora=s2lora_to_lora,
    description="Sparsely Shared LoRA: one A, B per shape shared across layers; per-module rank coefficients λ "
                "(s·B diag(λ) A) with an L1 sparsity penalty.",
    paper="Liu et al. 2023, arXiv:2309.11756",
    variants={"s2lora": {"r": 4}},
)
