"""LoRA-Composer-style region composition: each LoRA acts only inside its region, and regions do not attend to
each other.

"LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free Diffusion Models"
(Yang et al., arXiv:2403.11627); official code github.com/Young98CN/LoRA_Composer, ``region_lora/multi_lora_sample.py``.
What transfers to a UNet without text cross-attention, and how:

- **Region-aware LoRA injection** (``register_region_aware_attention`` → ``region_rewrite``, l.236-309): inside each
  region box the base output is replaced (``replace_ratio = 1``) by the concept LoRA's output, divided by the number
  of regions covering the pixel; outside every region the base output stays. The official code does this on the
  cross-attention output, with the region's own prompt as keys/values through that LoRA's ``to_k/to_v/to_out``.
  Here the concept lives in the LoRA, not in prompt tokens, so the same rule is applied to the noise prediction:
  ``ε = ε_base`` outside all regions, ``ε = Σ_r m_r ε_r / Σ_r m_r`` inside (base + K LoRAs in one batched forward).
- **Concept isolation, self-attention mask** (``new_forward`` l.374-402, ``self_attn_mask=True`` by default, l.588):
  queries inside region ``r`` get ``−1e6`` added to their scores for keys inside every other region. Transferred
  as is: :class:`RegionSelfAttention` adds that bias in every self-attention of the UNet, at each feature
  resolution (boxes scaled to the feature map with ``ceil`` / ``floor`` as the official ``replace_latents``).

What does not transfer (needs text cross-attention): the concept-enhancement and isolation *losses* on
cross-attention maps with test-time latent updates (``_compute_max_attention_per_index``, ``_update_latent``,
l.33-160), latent re-initialisation, which places each region's latent where its LoRA's trigger tokens attend
(``replace_latents``, l.186-229), and the layer-level injection of the regional prompt's keys and values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ...core.errors import FIELD, ConfigError
from ..sampler import CompositionConfig, Run, register_composition


def _pixel_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    top, left, bottom, right = box  # fractions (start_h, start_w, end_h, end_w), the official region order
    return math.ceil(top * height), math.ceil(left * width), math.floor(bottom * height), math.floor(right * width)


def region_masks(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> torch.Tensor:
    """(R, height, width) 0/1 masks of the boxes at a given resolution."""
    masks = torch.zeros(len(boxes), height, width)
    for i, box in enumerate(boxes):
        t, l, b, r = _pixel_box(box, height, width)
        masks[i, t:b, l:r] = 1.0
    return masks


def uncovered(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> dict[int, str]:
    """The boxes that cover no position of a ``height`` × ``width`` grid (boxes are rounded inward to whole
    positions, :func:`_pixel_box`): index -> their extent there before rounding, ``"0.4×0.8"``."""
    found = {}
    for i, box in enumerate(boxes):
        t, l, b, r = _pixel_box(box, height, width)
        if b <= t or r <= l:
            found[i] = f"{(box[2] - box[0]) * height:.3g}×{(box[3] - box[1]) * width:.3g}"
    return found


def isolation_bias(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> torch.Tensor:
    """(HW, HW) additive self-attention bias: −1e6 from queries in region r to keys in any other region."""
    flat = region_masks(boxes, height, width).reshape(len(boxes), -1)  # (R, HW)
    bias = torch.zeros(flat.shape[1], flat.shape[1])
    for r in range(len(boxes)):  # R regions (a handful), not LoRAs per step: built once per resolution
        others = (flat[[j for j in range(len(boxes)) if j != r]].sum(dim=0) > 0).float()
        bias = bias + flat[r][:, None] * others[None, :] * -1e6
    return bias


class RegionSelfAttention:
    """A diffusers attention processor: the default ``AttnProcessor2_0`` with :func:`isolation_bias` as mask."""

    def __init__(self, boxes: list[tuple[float, float, float, float]], inner):
        self.boxes, self.inner, self._bias = boxes, inner, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 4 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        b, _, h, w = hidden_states.shape
        if (h, w) not in self._bias:
            for i, extent in (uncovered(self.boxes, h, w) if len(self.boxes) > 1 else {}).items():
                warnings.warn(f"composer: region {i} {self.boxes[i]} covers no position of the {h}×{w} self-attention "
                              f"map ({extent} positions), so it is not isolated from the other regions at that "
                              "resolution (boxes are rounded inward to whole positions, as the official code).",
                              stacklevel=2)
            self._bias[(h, w)] = isolation_bias(self.boxes, h, w)
        mask = self._bias[(h, w)].to(hidden_states.dtype).expand(b, h * w, h * w)
        return self.inner(attn, hidden_states, None, mask, temb, **kwargs)


@dataclass
class ComposerConfig(CompositionConfig):
    """``regions``: one box per LoRA, ``(start_h, start_w, end_h, end_w)`` as fractions of the image (the official
    box order). ``self_attn_mask``: concept isolation in self-attention (official default True)."""

    regions: list[tuple[float, float, float, float]] | None = None
    self_attn_mask: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regions is None:
            raise ConfigError(f"composer needs {FIELD}: one (start_h, start_w, end_h, end_w) box per LoRA, in [0, 1]",
                              field="regions")
        self.regions = [tuple(float(v) for v in box) for box in self.regions]
        for box in self.regions:
            if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
                raise ConfigError(f"region {box} must be (start_h, start_w, end_h, end_w) with 0 <= start < end <= 1",
                                  field="regions")


@register_composition("composer", ComposerConfig, "each LoRA inside its region box, regions isolated in self-attention")
class LoraComposer:
    def __init__(self, config: ComposerConfig):
        self.config = config
        self._saved = None

    def start(self, run: Run) -> None:
        if len(self.config.regions) != len(run.loras):
            raise ConfigError(f"composer got {len(self.config.regions)} regions for {len(run.loras)} LoRAs")
        if self.config.self_attn_mask:
            from diffusers.models.attention_processor import Attention, AttnProcessor2_0

            attns = [m for m in run.unet.modules() if isinstance(m, Attention)]  # UNet2DModel has no set_attn_processor
            self._saved = [(m, m.processor) for m in attns]
            isolated = RegionSelfAttention(self.config.regions, AttnProcessor2_0())
            for m in attns:
                m.set_processor(isolated)

    def noise(self, run: Run, step: int, t, x):
        height, width = x.shape[-2:]
        gone = uncovered(self.config.regions, height, width)
        if gone:  # before any forward: that LoRA would be left out of the image without a word
            i, extent = next(iter(gone.items()))
            raise ConfigError(f"composer: region {i} {self.config.regions[i]} of LoRA {run.loras[i]!r} covers no pixel "
                              f"of the {height}×{width} image ({extent} pixels), so that LoRA would be left out. Make "
                              "the box cover at least one whole pixel (it is rounded inward: start up, end down), or "
                              "sample a larger image.", field="regions")
        preds = run.predict(x, t, [None, *run.loras])  # (1 + K, N, C, H, W): base, then each LoRA
        masks = region_masks(self.config.regions, x.shape[-2], x.shape[-1]).to(x.dtype)[:, None, None]  # (K,1,1,H,W)
        count = masks.sum(dim=0)
        inside = (masks * preds[1:]).sum(dim=0) / count.clamp_min(1)
        return torch.where(count > 0, inside, preds[0])

    def finish(self, run: Run) -> None:
        for module, processor in self._saved or []:
            module.set_processor(processor)
