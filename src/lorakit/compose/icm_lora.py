"""ICM-LoRA: the conditional VAE over flattened LoRA weights, and the flattening itself.

Paper: "In-Context Meta LoRA Generation", Shao et al., IJCAI 2025, arXiv 2501.17635.
Official code: github.com/YihuaJerry/ICM-LoRA @ 0b0057c (read for this file: ``model/CVAE_design.py``,
``TrainScript_CVAE.py``, ``utils/normalizeLoraWeight_small.py``, ``utils/ReconstructLora_cvae.py``).

A collection of LoRA adapters (several checkpoints per task) is flattened tensor by tensor into one vector
each; every tensor is normalised on its own, ``(W - mean(W)) / std(W)`` (``normalizeLoraWeight_small.py``
l.34; ``std`` is torch's unbiased std), and its mean/std are kept to undo it. A CVAE learns these vectors
conditioned on a task vector ``c`` (the in-context condition, see ``icm_lora_generator``):

    encoder   x (B, L) -> pad to L' (a multiple of ``divide_slice_length``) -> len(channels) stride-2
              Conv1d(k) + BatchNorm + LeakyReLU -> flatten -> Linear -> h (B, latent_dim)
              mu = fc_mu([h; c]),  log_var = fc_var([h; c])                       (CVAE_design.py l.74-92)
    decoder   Linear([z; c]) -> (B, channels[-1], L'/2^n) -> mirrored ConvTranspose1d + BN + ELU stages
              -> ConvTranspose1d + BN + ELU + Conv1d(->1) -> x̂ (B, L')             (l.43-58, 99-109)
    loss      MSE(x̂, pad(x)) + kld_weight · mean_b( -½ Σ_j (1 + log_var - mu² - exp(log_var)) )  (l.119-122)

Defaults are the official ones: latent 256, channels 8,16,32,64,128,256,256,128,64,32,16,8, kernel 7,
``divide_slice_length`` 4096, ``kld_weight`` 0.005.

Where the official code is not what it means, this follows the intent and says so:
- ``TrainScript_CVAE.py`` feeds ``x`` as (B, 1, L) while ``decode`` returns (B, L'), so its ``F.mse_loss``
  broadcasts to (B, B, L') and compares every sample with every reconstruction in the batch; here the
  reconstruction is compared with its own input only (identical to the official value when B == 1).
- ``CVAE_design.py`` reverses its channel list in place, so ``self.d_model[-1]`` in ``decode`` is the first
  encoder width; the official list is a palindrome at its ends (8 ... 8) so nothing changes, and here the
  decoder starts from the last encoder width for any list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_non_negative, check_positive_ints, field_error
from ..core.errors import ConfigError

OFFICIAL_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)


@dataclass
class CvaeConfig:
    """Shape of the ICM-LoRA CVAE (``model/CVAE_design.py``'s constructor arguments).

    ``divide_slice_length`` must be a multiple of ``2 ** len(channels)``: the input is padded to a multiple of
    it and halved once per stage. Raises ConfigError naming the field to change.
    """

    latent_dim: int = 256
    channels: tuple[int, ...] = OFFICIAL_CHANNELS
    kernel_size: int = 7
    divide_slice_length: int = 4096
    kld_weight: float = 0.005

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        check_positive_ints(self, "latent_dim", "kernel_size", "divide_slice_length")
        if not self.channels or min(self.channels) <= 0:
            raise field_error(self, "channels", f" must be a non-empty list of positive widths, got {self.channels}.")
        if self.kernel_size % 2 == 0:
            raise field_error(self, "kernel_size", f" must be odd (padding k//2 keeps lengths), got {self.kernel_size}.")
        if self.divide_slice_length % 2 ** len(self.channels):
            raise field_error(self, "divide_slice_length", f" ({self.divide_slice_length}) must be a multiple of "
                              f"2**len(channels) = {2 ** len(self.channels)}; set it to that or a multiple of it.")
        check_non_negative(self, "kld_weight")


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) summed over latent dims, averaged over the batch (CVAE_design.py l.121)."""
    return torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)


class LoraCvae(nn.Module):
    """The ICM-LoRA conditional VAE over flattened, normalised LoRA vectors.

    ``input_length``: L, the flattened adapter length; ``condition_dim``: length of the task vector c.
    ``forward(x (B, L), c (B, condition_dim))`` returns ``(loss, recon_loss, kld_loss)`` (scalars);
    ``decode(z (B, latent_dim), c)`` returns (B, L') with L' = L padded (cut to L by the caller).
    """

    def __init__(self, config: CvaeConfig, input_length: int, condition_dim: int):
        super().__init__()
        if input_length <= 0 or condition_dim <= 0:
            raise ConfigError(f"input_length and condition_dim must be positive, got {input_length}, {condition_dim}")
        self.config, self.input_length, self.condition_dim = config, input_length, condition_dim
        chans, k, step = config.channels, config.kernel_size, config.divide_slice_length
        self.padded_length = -(-input_length // step) * step
        self.last_length = self.padded_length // 2 ** len(chans)
        widths = (1, *chans)
        self.encoder = nn.Sequential(*(
            nn.Sequential(nn.Conv1d(a, b, k, 2, k // 2), nn.BatchNorm1d(b), nn.LeakyReLU())
            for a, b in zip(widths[:-1], widths[1:])))
        self.to_latent = nn.Linear(self.last_length * chans[-1], config.latent_dim)
        self.fc_mu = nn.Linear(config.latent_dim + condition_dim, config.latent_dim)
        self.fc_var = nn.Linear(config.latent_dim + condition_dim, config.latent_dim)
        self.to_decode = nn.Linear(config.latent_dim + condition_dim, self.last_length * chans[-1])
        back = chans[::-1]
        self.decoder = nn.Sequential(*(
            nn.Sequential(nn.ConvTranspose1d(a, b, k, 2, k // 2, output_padding=1), nn.BatchNorm1d(b), nn.ELU())
            for a, b in zip(back[:-1], back[1:])))
        self.final_layer = nn.Sequential(
            nn.ConvTranspose1d(back[-1], back[-1], k, 2, k // 2, output_padding=1), nn.BatchNorm1d(back[-1]), nn.ELU(),
            nn.Conv1d(back[-1], 1, k, 1, k // 2))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L') with zeros at the end."""
        if x.shape[-1] != self.input_length:
            raise ValueError(f"expected flattened adapters of length {self.input_length}, got {x.shape[-1]}")
        return F.pad(x, (0, self.padded_length - self.input_length))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.pad(x)[:, None, :])  # (B, channels[-1], L'/2^n)
        h = self.to_latent(h.flatten(1))  # (B, latent_dim)
        h = torch.cat([h, c], dim=-1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.to_decode(torch.cat([z, c], dim=-1))
        h = h.view(-1, self.config.channels[-1], self.last_length)
        return self.final_layer(self.decoder(h))[:, 0, :]  # (B, L')

    @staticmethod
    def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + eps * torch.exp(0.5 * log_var)

    def loss(self, recons: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor):
        """``(loss, recon, kld)``: MSE over the padded vector + kld_weight · KL (CVAE_design.py l.119-122)."""
        recon = F.mse_loss(recons, self.pad(x), reduction="mean")
        kld = kl_divergence(mu, log_var)
        return recon + self.config.kld_weight * kld, recon, kld

    def forward(self, x: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None):
        mu, log_var = self.encode(x, c)
        recons = self.decode(self.reparameterize(mu, log_var, generator), c)
        return self.loss(recons, x, mu, log_var)


# ---------------------------------------------------------------- flattening


@dataclass(frozen=True)
class AdapterLayout:
    """Which tensors, in which order, make up a flattened adapter: ``(key, shape)`` pairs in sorted key order
    (the order safetensors stores them, which is what the official ``load_file`` loop walks)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> "AdapterLayout":
        return cls(tuple((key, tuple(tensors[key].shape)) for key in sorted(tensors)))

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.entries]

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(shape).numel()) for _, shape in self.entries]

    @property
    def length(self) -> int:
        return sum(self.sizes)


def flatten_tensors(tensors: Mapping[str, torch.Tensor], layout: AdapterLayout) -> torch.Tensor:
    """The tensors of ``layout`` concatenated, flattened, in layout order: (layout.length,) float32."""
    return torch.cat([tensors[key].detach().reshape(-1).float() for key in layout.keys])


def unflatten_tensors(vector: torch.Tensor, layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_tensors` (exact). Raises ValueError when the length does not match."""
    if vector.dim() != 1 or vector.numel() != layout.length:
        raise ValueError(f"a flattened adapter of this layout has {layout.length} values, got shape {tuple(vector.shape)}")
    parts = torch.split(vector, layout.sizes)
    return {key: part.reshape(shape).clone() for (key, shape), part in zip(layout.entries, parts)}


def tensor_stats(tensors: Mapping[str, torch.Tensor], layout: AdapterLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (mean, unbiased std), each (n_tensors,), as ``normalizeLoraWeight_small.py`` l.34-43 keeps them."""
    means = torch.stack([tensors[key].detach().float().mean() for key in layout.keys])
    stds = torch.stack([tensors[key].detach().float().std() for key in layout.keys])
    return means, stds


def _expand(stat: torch.Tensor, layout: AdapterLayout) -> torch.Tensor:
    return torch.repeat_interleave(stat, torch.tensor(layout.sizes))  # (n_tensors,) -> (L,)


def normalize(vector: torch.Tensor, layout: AdapterLayout, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """``(W - mean) / std`` tensor by tensor on a flattened adapter; a constant tensor (std 0) maps to zeros."""
    safe = torch.where(stds > 0, stds, torch.ones_like(stds))
    return (vector - _expand(means, layout)) / _expand(safe, layout)


def denormalize(vector: torch.Tensor, layout: AdapterLayout, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """``x · std + mean`` tensor by tensor (``ReconstructLora_cvae.py`` l.155-161)."""
    return vector * _expand(stds, layout) + _expand(means, layout)


def relative_errors(original: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                    keys: Sequence[str]) -> tuple[dict[str, float], float]:
    """``‖other - original‖ / ‖original‖`` per tensor and over all ``keys`` together (Frobenius norms)."""
    per = {k: float((other[k] - original[k]).norm() / original[k].norm().clamp_min(1e-12)) for k in keys}
    num = sum(float((other[k] - original[k]).norm() ** 2) for k in keys)
    den = sum(float(original[k].norm() ** 2) for k in keys)
    return per, (num / max(den, 1e-24)) ** 0.5
