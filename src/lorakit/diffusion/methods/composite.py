"""LoRA Composite: every step, the mean over LoRAs of each LoRA's guided noise prediction.

"Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv:2402.16843, §3.2, Eq. 4-5):
``ε = (1/K) Σ_k [ε_k(∅) + w (ε_k(c) − ε_k(∅))]``. The official pipeline (``pipeline/pipeline_0.26.3.py``
l.1037-1071) runs one UNet forward per LoRA and averages the unconditional and conditional halves before guidance,
which is the same by linearity. Here the K LoRAs (× both guidance branches) run in one batched forward, each row
routed to its LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sampler import CompositionConfig, Run, register_composition


@dataclass
class CompositeConfig(CompositionConfig):
    pass


@register_composition("composite", CompositeConfig, "mean of the per-LoRA guided noise predictions")
class LoraComposite:
    def __init__(self, config: CompositeConfig):
        self.config = config

    def noise(self, run: Run, step: int, t, x):
        return run.predict(x, t, run.loras).mean(dim=0)
