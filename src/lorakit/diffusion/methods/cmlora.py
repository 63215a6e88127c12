"""CMLoRA: Cached Multi-LoRA composition with a Fourier-frequency LoRA order.

"Cached Multi-LoRA Composition for Multi-Concept Image Generation" (Zou, Shen, Bouganis, Zhao; arXiv:2502.04923,
ICLR 2025); official code github.com/Yqcca/CMLoRA. Followed here: the *offline* pipeline
``LoRA_Cache/pipelines/stable_diffusion/pipeline_offline.py`` (profiled LoRA order), l.1085-1175:

1. **Frequency order.** LoRAs are split into a high-frequency group (``real_list``: characters, clothing, objects,
   styles) integrated first and a low-frequency group (``abs_list``: backgrounds) (``check_anime_lora``, l.63-82,
   a hand-made partition from the authors' profiling in ``fft_analysis.ipynb``). lorakit profiles instead of
   hard-coding: each LoRA generates ``profile_images`` images alone, and its score is the official
   ``cal_mean_relative_log_amplitudes`` (``pipeline_online.py`` l.63-91): the radially averaged FFT amplitude,
   normalised by its maximum, averaged over radii from ``high_frequency_start`` of the largest radius outwards
   (official: radius 80 of a 512×512 image's 362, i.e. 0.22). LoRAs are ordered by decreasing score; the last
   ``num_low_frequency`` form the low-frequency group.
2. **Dominant LoRA and weights.** With K LoRAs, ``c = K − 0.5``, ``w_nondom = K / (c + K − 1)``, ``w_dom = c ·
   w_nondom`` (l.1088-1091; the weights sum to K), and ``ε = (1/K) Σ_k w_k ε_k`` with each ``ε_k`` that LoRA's
   guided prediction (l.1162-1200). The code decays ``dom_lora_coeff`` at refresh steps but never recomputes the
   weights from it, so the weights stay constant; lorakit does the same.
3. **Cache schedule** (:func:`cmlora_schedule`). Refresh steps ``interval_seq``: every ``cache_interval``-th step
   (``uniform=True``, the default), all steps for 1, and for 0 the three-rate schedule of l.1078-1082. At a refresh
   step the LoRA ``indicator mod H`` (H = high-frequency group size) gets a fresh full forward and becomes
   dominant; after ``switch_fraction`` of the steps (official: step 120 of 220, ``compose_offline.py`` default)
   and when a low-frequency group exists, the refreshed and dominant index shifts by one
   (``((indicator − 1) mod H) + 1``), bringing the low-frequency LoRA in. Every other LoRA reuses its cached deep
   features (:func:`lorakit.diffusion.unet_cache.cached_unet_forward`); caching is on only for
   ``cache_interval > 1`` (``quick_replicate=cache_interval > 1``). Step 0 runs every LoRA in full.

   Official-code slip, resolved by intent: after the switch step the code writes ``prv_features_list[1:][j] =
   None``, which clears an element of a *copy* of the list (a no-op), so no cache would ever be refreshed again;
   lorakit refreshes the LoRA it names (index ``1 + j``), the one that is dominant at that step.

What differs: the official cache unit is a transformer block inside the outermost SD level (``cache_layer_id=0,
cache_block_id=1``); here it is a whole UNet level (``cache_depth`` outer levels recomputed), the natural unit of
a ``UNet2DModel``. The online variant (order decided during sampling from the latent's spectrum) is not ported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import FIELD, ConfigError
from ..sampler import CompositionConfig, Run, register_composition, scheduler_step
from ..unet_cache import cached_unet_forward


def mean_relative_log_amplitude(image: np.ndarray | torch.Tensor, high_frequency_start: float = 80 / 362) -> float:
    """High-frequency score of a 2-D image (H, W), as the official ``cal_mean_relative_log_amplitudes``.

    ``|fftshift(fft2(image))|`` averaged over integer radius bins around the centre, divided by its maximum (the
    DC term for natural images), then averaged over the bins from ``high_frequency_start · max radius`` outward.
    The official code starts at bin 80 for 512×512 images (max radius 362); the start is a fraction here so that
    16×16 images work the same way."""
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if img.ndim != 2:
        raise ConfigError(f"expected a 2-D image (H, W), got shape {img.shape}")
    amplitude = np.abs(np.fft.fftshift(np.fft.fft2(img)))
    rows, cols = amplitude.shape
    y, x = np.meshgrid(np.arange(rows) - rows // 2, np.arange(cols) - cols // 2, indexing="ij")
    radius = np.sqrt(x ** 2 + y ** 2).astype(int).reshape(-1)
    sums = np.bincount(radius, weights=amplitude.reshape(-1))
    counts = np.bincount(radius)
    profile = sums / np.maximum(counts, 1)
    profile = profile / profile.max() if profile.max() > 0 else profile
    start = int(high_frequency_start * radius.max())
    return float(profile[start:].mean())


def frequency_order(scores: dict[str, float]) -> list[str]:
    """LoRA names by decreasing high-frequency score (ties keep the given order)."""
    return sorted(scores, key=lambda n: -scores[n])


def refresh_steps(num_steps: int, cache_interval: int) -> list[int]:
    """The official ``interval_seq`` with ``uniform=True`` (``pipeline_offline.py`` l.1072-1098)."""
    if cache_interval == 0:
        a, b = int(0.375 * num_steps), int(0.875 * num_steps)
        return sorted(list(range(0, a, 2)) + list(range(a, b, 3)) + list(range(b, num_steps, 2)))
    if cache_interval == 1:
        return list(range(num_steps))
    return list(range(0, num_steps, cache_interval))


def dominant_weights(num_loras: int) -> tuple[float, float]:
    """(w_dom, w_nondom) of ``pipeline_offline.py`` l.1088-1091."""
    coeff = num_loras - 0.5
    nondom = num_loras / (coeff + num_loras - 1)
    return nondom * coeff, nondom


def cmlora_schedule(num_steps: int, num_high: int, num_low: int, cache_interval: int,
                    switch_step: int) -> list[tuple[int | None, int]]:
    """Per step ``(refreshed LoRA index or None, dominant LoRA index)`` over the ordered list high + low."""
    if num_high <= 0:
        raise ConfigError("CMLoRA needs at least one high-frequency LoRA")
    refresh_at, plan, indicator = set(refresh_steps(num_steps, cache_interval)), [], 0
    for i in range(num_steps):
        late = num_low > 0 and i > switch_step
        refreshed = None
        if i in refresh_at:
            refreshed = indicator % num_high + (1 if late else 0)
            indicator += 1
        plan.append((refreshed, (indicator - 1) % num_high + (1 if late else 0)))
    return plan


@dataclass
class CMLoRAConfig(CompositionConfig):
    """``cache_interval``: refresh period (official list 0, 1, 2, 3, 5; ``compose_offline.py`` l.168).
    ``order``: the LoRAs high- to low-frequency (skips profiling). ``num_low_frequency``: size of the
    low-frequency group at the end of the order. ``cache_depth``: outer UNet levels always recomputed."""

    cache_interval: int = 2
    switch_fraction: float = 120 / 220
    high_frequency_start: float = 80 / 362
    order: list[str] | None = None
    num_low_frequency: int = 1
    profile_images: int = 4
    profile_steps: int = 10
    cache_depth: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_interval < 0:
            raise ConfigError(f"{FIELD} must be >= 0 (0: the official three-rate schedule), got {self.cache_interval}",
                              field="cache_interval")
        for name, high_open in (("switch_fraction", False), ("high_frequency_start", True)):
            value = getattr(self, name)
            inside = 0 <= value < 1 if high_open else 0 <= value <= 1
            if not inside:
                raise ConfigError(f"{FIELD} must be in [0, 1{')' if high_open else ']'}, got {value}", field=name)
        if self.num_low_frequency < 0:
            raise ConfigError(f"{FIELD} must be >= 0, got {self.num_low_frequency}", field="num_low_frequency")
        for name in ("profile_images", "profile_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{FIELD} must be > 0, got {getattr(self, name)}", field=name)


def profile_loras(run: Run, config: CMLoRAConfig) -> dict[str, float]:
    """Each LoRA's mean high-frequency score over ``profile_images`` images it generates alone (DDIM-style loop
    on the run's scheduler, all LoRAs in one batched forward per step)."""
    sched = run.scheduler
    g = torch.Generator().manual_seed(1234)
    n, k = config.profile_images, len(run.loras)
    unet = run.unet
    x = torch.randn((k * n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), generator=g)
    sched.set_timesteps(config.profile_steps)
    x = x * sched.init_noise_sigma
    names = [name for name in run.loras for _ in range(n)]
    from ...core.routing import routing
    from ..model import NULL_CLASS

    labels = torch.full((k * n,), NULL_CLASS)
    for t in sched.timesteps:
        with routing(adapter_names=names):
            eps = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler_step(sched, eps, t, x, g)
    sched.set_timesteps(run.num_steps)  # the run's own schedule back
    images = x.clamp(-1, 1).mean(dim=1)  # (K·n, H, W): channel mean, as the official np.mean(latents[0], axis=0)
    scores = [mean_relative_log_amplitude(im, config.high_frequency_start) for im in images]
    return {name: float(np.mean(scores[i * n:(i + 1) * n])) for i, name in enumerate(run.loras)}


@register_composition("cmlora", CMLoRAConfig, "frequency-ordered dominant LoRA, cached non-dominant LoRAs")
class CMLoRA:
    def __init__(self, config: CMLoRAConfig):
        self.config = config

    def start(self, run: Run) -> None:
        c = self.config
        if c.order is not None:
            if sorted(c.order) != sorted(run.loras):
                raise ConfigError(f"order {c.order} must list exactly the composed LoRAs {run.loras}")
            order, scores = list(c.order), None
        else:
            scores = profile_loras(run, c)
            order = frequency_order(scores)
        k = len(order)
        low = min(c.num_low_frequency, k - 1)
        run.state.update(order=order, scores=scores, num_low=low, cache=None,
                         schedule=cmlora_schedule(run.num_steps, k - low, low, c.cache_interval,
                                                  int(round(c.switch_fraction * run.num_steps))),
                         weights=dominant_weights(k), full_rows=0, rows=0)

    def noise(self, run: Run, step: int, t, x):
        st = run.state
        order, (refreshed, dominant) = st["order"], st["schedule"][step]
        names, labels = run.rows(order)
        per_lora = len(names) // len(order)
        xs = x.repeat(len(names) // x.shape[0], 1, 1, 1)
        caching = self.config.cache_interval > 1
        refresh = torch.zeros(len(names), dtype=torch.bool)
        if refreshed is not None:
            refresh[refreshed * per_lora:(refreshed + 1) * per_lora] = True
        cache = st["cache"] if caching else None
        out, st["cache"] = cached_unet_forward(run.unet, xs, t, labels, names, refresh, cache, self.config.cache_depth)
        st["full_rows"] += len(names) if cache is None else int(refresh.sum())
        st["rows"] += len(names)
        guided = run.guide(out, len(order))  # (K, N, C, H, W)
        w_dom, w_nondom = st["weights"]
        w = torch.full((len(order),), w_nondom, dtype=guided.dtype)
        w[dominant] = w_dom
        return (w.reshape(-1, 1, 1, 1, 1) * guided).mean(dim=0)
