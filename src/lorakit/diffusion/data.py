"""Real images that ship offline: scikit-learn's 8×8 handwritten digits, upscaled, and their styled variants.

``load_digits`` (1,797 grey images of the digits 0-9, values 0..16, bundled inside scikit-learn, no download) is
upscaled bilinearly to ``size``×``size`` and mapped to [-1, 1] (ink = +1, paper = -1), one channel.

Styles (each an image → image function on that [-1, 1] scale, so they compose):

- ``thick``: morphological dilation with a 3×3 square (a max-pool of stride 1): strokes one pixel wider each side.
- ``inverted``: ``-x``: white paper becomes black and ink white.
- ``thin``: morphological erosion with a plus-shaped 3×3 element (min over the pixel and its 4 neighbours).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, did_you_mean


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _erode(x: torch.Tensor) -> torch.Tensor:
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)  # outside the image is paper
    neighbours = torch.stack([pad[..., 1:-1, 1:-1], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1], pad[..., 1:-1, :-2],
                              pad[..., 1:-1, 2:]])
    return neighbours.min(dim=0).values


STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "thick": _dilate,
    "inverted": lambda x: -x,
    "thin": _erode,
}


def check_style(name: str) -> None:
    if name not in STYLES:
        raise ConfigError(f"unknown style {name!r}.{did_you_mean(name, STYLES)} Styles: {sorted(STYLES)}")


def apply_styles(images: torch.Tensor, styles: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``images`` (N, 1, H, W) in [-1, 1] with each style applied in turn (``thick`` before ``inverted``: dilation
    acts on ink, so it runs on the uninverted image whatever the order given)."""
    for s in styles:
        check_style(s)
    ordered = [s for s in STYLES if s in styles and s != "inverted"] + (["inverted"] if "inverted" in styles else [])
    for s in ordered:
        images = STYLES[s](images)
    return images


def load_digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64 digit classes).

    Raises ConfigError for a size below 8 (the source resolution)."""
    if size < 8:
        raise ConfigError(f"size must be at least 8 (the digits are 8×8), got {size}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(digits.target, dtype=torch.long)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) → uint8 (N, H, W, C) for PNGs."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
