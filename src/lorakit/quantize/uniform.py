"""Uniform affine weight quantization and round-to-nearest (RTN), the baseline every PTQ method is compared with.

Asymmetric min-max quantization per output channel (or per group of ``group_size`` input columns), as in
Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
arXiv:1712.05877, eq. (1) ``r = S(q − Z)``, with the range widened to hold 0 exactly (their §2.1):

    x_min = min(min W, 0)    x_max = max(max W, 0)
    s = (x_max − x_min) / (2^b − 1)      z = round(−x_min / s)
    q = clamp(round(W / s) + z, 0, 2^b − 1)          Ŵ = s · (q − z)

Weights are (out, in) here; GPT-2's Conv1D stores (in, out) and is transposed by the caller (``oriented``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import FIELD, ConfigError

EPS = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` per weight (2-8) and ``group_size`` input columns per scale (None: one scale per output row)."""

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"{FIELD} must be an integer from 2 to 8, got {self.bits!r}.", field="bits")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"{FIELD} must be a positive integer or None (per output channel), got "
                              f"{self.group_size}.", field="group_size")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def grouped(self, w: torch.Tensor, where: str = "weight") -> torch.Tensor:
        """(out, in) → (out, groups, group_size); raises ConfigError when group_size does not divide ``in``."""
        out_f, in_f = w.shape
        g = self.group_size or in_f
        if in_f % g:
            raise ConfigError(f"group_size={self.group_size} does not divide the {in_f} input columns of {where}; "
                              f"pick a divisor of {in_f} or group_size=None (one scale per output channel).")
        return w.reshape(out_f, in_f // g, g)


def minmax_params(w: torch.Tensor, spec: QuantSpec, where: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (out, groups, 1), float32: the min-max step size and integer zero point."""
    wg = spec.grouped(w.float(), where)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / spec.qmax).clamp_min(EPS)
    zero = torch.round(-lo / scale)
    return scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grouped integer codes (out, groups, g) back to real values, (out, in)."""
    return (scale * (q - zero)).reshape(q.shape[0], -1)


def rtn_codes(w: torch.Tensor, spec: QuantSpec, where: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of round-to-nearest; codes are integers in [0, 2^b − 1] stored as float, (out, groups, g)."""
    scale, zero = minmax_params(w, spec, where)
    q = torch.clamp(torch.round(spec.grouped(w.float(), where) / scale) + zero, 0, spec.qmax)
    return q, scale, zero


def rtn(w: torch.Tensor, spec: QuantSpec, where: str = "weight") -> torch.Tensor:
    """Round-to-nearest fake quantization of an (out, in) weight: Ŵ, same shape and dtype as ``w``."""
    q, scale, zero = rtn_codes(w, spec, where)
    return dequantize(q, scale, zero).to(w.dtype)
