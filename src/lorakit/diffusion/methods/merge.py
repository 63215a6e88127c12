"""LoRA Merge: one UNet with the weighted sum of the LoRAs' weight deltas, ``W' = W + Σ_k w_k s ΔW_k``.

The baseline of "Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv:2402.16843, §2): the official
``compose_lora.py`` (l.77-79) activates all LoRAs at once (``pipeline.set_adapters(cur_loras)``, each at weight 1,
times ``lora_scale``), which for LoRA is exactly the sum of the deltas. lorakit folds that sum into the base weights
once per generation (``merge_adapter``, exact restore afterwards), so each step is one plain UNet forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.errors import FIELD, ConfigError
from ...core.model import merge_adapter, set_adapter
from ..sampler import CompositionConfig, Run, lora_scaling, register_composition


@dataclass
class MergeConfig(CompositionConfig):
    """``weights``: one weight per LoRA (default 1.0 each, as ``set_adapters`` with no weights)."""

    weights: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if not all(math.isfinite(w) for w in self.weights):  # a NaN weight made every image NaN
                raise ConfigError(f"{FIELD} must be finite numbers, got {self.weights}", field="weights")


@register_composition("merge", MergeConfig, "weighted sum of the LoRA deltas merged into the weights")
class LoraMerge:
    def __init__(self, config: MergeConfig):
        self.config = config
        self._scaled = None

    _scaled = None

    def start(self, run: Run) -> None:
        weights = self.config.weights or [1.0] * len(run.loras)
        if len(weights) != len(run.loras):
            raise ConfigError(f"merge got {len(weights)} weights for {len(run.loras)} LoRAs")
        self._scaled = lora_scaling(run.unet, run.loras, weights)
        self._scaled.__enter__()
        set_adapter(run.unet, run.loras)
        merge_adapter(run.unet, run.loras, keep_original=True)  # unmerging restores the base bit for bit

    def noise(self, run: Run, step: int, t, x):
        return run.predict_plain(x, t)

    def finish(self, run: Run) -> None:
        from ...core.model import unmerge_adapter

        if self._scaled is None:  # start failed before scaling anything (e.g. a wrong number of weights)
            return
        unmerge_adapter(run.unet)
        self._scaled.__exit__(None, None, None)
        self._scaled = None
