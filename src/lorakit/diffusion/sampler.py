"""Training-free composition of several LoRAs while denoising: the shared sampling loop and the method registry.

A composition method is a config dataclass plus a class with ``noise(run, step, t, x) -> ε`` (the guided noise
prediction for the current sample ``x``), optionally ``start(run)`` and ``finish(run)``, registered once with
:func:`register_composition`. Methods live one per file in :mod:`lorakit.diffusion.methods` (merge, switch,
composite, cmlora, composer). The loop is the diffusers pipeline's: ``x_T ~ N(0, I)``, then for each scheduler
timestep ``x ← scheduler.step(ε, t, x)``.

Every per-step prediction that needs several LoRAs runs them in **one batched forward**: the batch holds one block
of rows per LoRA (and per guidance branch), and ``lorakit.routing(adapter_names=rows)`` sends each row through its
own LoRA (one gathered bmm per adapted layer), so there is no Python loop over LoRAs per step.

Classifier-free guidance (Ho & Salimans, arXiv:2207.12598) is the diffusers rule: used when ``guidance_scale > 1``,
``ε = ε_uncond + w (ε_cond − ε_uncond)`` with the unconditional rows on the null class; the LoRA of a block is
active in both of its branches, as in the Multi-LoRA-Composition pipeline (``pipeline/pipeline_0.26.3.py``,
l.1037-1071).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.config import check_field_types
from ..core.errors import FIELD, ConfigError, did_you_mean
from ..core.model import adapter_layers, adapter_state, check_adapter, merged_adapters
from ..core.routing import routing
from .model import NULL_CLASS


@dataclass
class CompositionConfig:
    """Fields every method shares. ``lora_scale`` multiplies every LoRA's delta (the papers' ``cross_attention_kwargs
    scale``: 0.8 in Multi-LoRA-Composition ``compose_lora.py``, 1.0 in CMLoRA ``compose_offline.py``)."""

    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)  # a `--set key=value` of the wrong type is named here, not a TypeError later
        if not (self.lora_scale > 0 and math.isfinite(self.lora_scale)):  # inf made every image NaN
            raise ConfigError(f"{FIELD} must be a finite number > 0, got {self.lora_scale}", field="lora_scale")


@dataclass
class Composition:
    name: str
    config_cls: type
    method_cls: type
    summary: str


_REGISTRY: dict[str, Composition] = {}


def register_composition(name: str, config_cls: type, summary: str) -> Callable[[type], type]:
    """Class decorator: register a composition method under ``name`` with its config dataclass."""

    def wrap(cls: type) -> type:
        _REGISTRY[name] = Composition(name, config_cls, cls, summary)
        return cls

    return wrap


def list_compositions() -> list[Composition]:
    from . import methods  # noqa: F401  (registers the built-in methods)

    return list(_REGISTRY.values())


def get_composition(name: str) -> Composition:
    """The registered method ``name``; ConfigError with near matches otherwise."""
    names = [c.name for c in list_compositions()]
    if name not in _REGISTRY:
        raise ConfigError(f"unknown composition method {name!r}.{did_you_mean(name, names)} Methods: {names}")
    return _REGISTRY[name]


def make_config(method: str, **fields: Any) -> CompositionConfig:
    """The config of ``method`` from keyword fields; ConfigError naming unknown fields (with near matches)."""
    comp = get_composition(method)
    known = set(comp.config_cls.__dataclass_fields__)
    for k in fields:
        if k not in known:
            raise ConfigError(f"{method} has no option {k!r}.{did_you_mean(k, known)} Options: {sorted(known)}")
    return comp.config_cls(**fields)


@contextlib.contextmanager
def lora_scaling(unet: nn.Module, names: Sequence[str], scale: float | Sequence[float]) -> Iterator[None]:
    """Multiply each named LoRA's ``scaling`` (``s = α / r``) by ``scale`` (one float, or one per name) inside the
    block. Raises ConfigError for a delta without a ``scaling`` attribute when the scale is not 1."""
    scales = [float(scale)] * len(names) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(names):
        raise ConfigError(f"got {len(scales)} scales for {len(names)} LoRAs")
    touched: list[tuple[nn.Module, float]] = []
    try:
        for name, s in zip(names, scales):
            if s == 1.0:
                continue
            for _, layer in adapter_layers(unet):
                delta = layer.adapters[name] if name in layer.adapters else None
                if delta is None:
                    continue
                if not isinstance(getattr(delta, "scaling", None), float):
                    raise ConfigError(f"LoRA {name!r} ({type(delta).__name__}) has no scalar `scaling` to scale")
                touched.append((delta, delta.scaling))
                delta.scaling = delta.scaling * s
        yield
    finally:
        for delta, old in reversed(touched):
            delta.scaling = old


@dataclass
class Run:
    """One sampling run: what a method's ``noise`` may use. ``labels`` (N,) the class per image (``NULL_CLASS`` for
    none); ``loras`` the adapter names in the order given."""

    unet: nn.Module
    scheduler: Any
    loras: list[str]
    labels: torch.Tensor
    guidance_scale: float
    num_steps: int
    timesteps: torch.Tensor
    state: dict = field(default_factory=dict)  # a method's per-run memory (caches, schedules)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def rows(self, groups: Sequence[str | None]) -> tuple[list[str | None], torch.Tensor]:
        """Per-row adapter names and labels of a batch with one block per group (LoRA name or None for the base):
        block g holds the N conditional rows, then (with guidance) the N unconditional rows."""
        n = self.labels.shape[0]
        branches = [self.labels, torch.full_like(self.labels, NULL_CLASS)] if self.cfg else [self.labels]
        names = [g for g in groups for _ in branches for _ in range(n)]
        labels = torch.cat([b for _ in groups for b in branches])
        return names, labels

    def guide(self, out: torch.Tensor, groups: int) -> torch.Tensor:
        """(groups · branches · N, C, H, W) raw predictions → (groups, N, C, H, W) guided ε."""
        n = self.labels.shape[0]
        out = out.reshape(groups, 2 if self.cfg else 1, n, *out.shape[1:])
        if not self.cfg:
            return out[:, 0]
        cond, uncond = out[:, 0], out[:, 1]
        return uncond + self.guidance_scale * (cond - uncond)

    def predict(self, x: torch.Tensor, t: torch.Tensor, groups: Sequence[str | None]) -> torch.Tensor:
        """Guided ε of every group for sample ``x`` (N, C, H, W), in one batched forward: (G, N, C, H, W)."""
        names, labels = self.rows(groups)
        xs = x.repeat(len(names) // x.shape[0], 1, 1, 1)
        with routing(adapter_names=names):
            out = self.unet(xs, t, class_labels=labels).sample
        return self.guide(out, len(groups))

    def predict_plain(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided ε with whatever the model has active or merged (no per-row routing): (N, C, H, W)."""
        names, labels = self.rows([None])
        xs = x.repeat(len(names) // x.shape[0], 1, 1, 1)
        return self.guide(self.unet(xs, t, class_labels=labels).sample, 1)[0]


def scheduler_step(scheduler: Any, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """``scheduler.step(eps, t, x).prev_sample``, drawing any sampling noise (DDPM's variance, DDIM with η > 0)
    from ``generator`` when the scheduler takes one, as diffusers pipelines do (``prepare_extra_step_kwargs``);
    without it a stochastic sampler draws from torch's global generator and ``seed`` would not fix the images."""
    takes = "generator" in inspect.signature(scheduler.step).parameters
    return scheduler.step(eps, t, x, **({"generator": generator} if takes else {})).prev_sample


def _check_loras(unet: nn.Module, loras: Sequence[str]) -> None:
    if not loras:
        raise ConfigError("give at least one LoRA to compose")
    if len(set(loras)) != len(loras):
        raise ConfigError(f"each LoRA once, got {list(loras)}")
    for name in loras:
        check_adapter(unet, name)
    merged = merged_adapters(unet)
    if merged:
        raise ConfigError(f"adapters {merged} are merged into the UNet; unmerge_adapter first (composition routes "
                          f"LoRAs per row)")


@torch.no_grad()
def compose_images(unet: nn.Module, scheduler: Any, loras: Sequence[str], method: str | CompositionConfig = "composite",
                   *, num_images: int = 8, class_label: int | None = None, guidance_scale: float = 1.0,
                   num_inference_steps: int = 20, seed: int = 0, height: int | None = None,
                   width: int | None = None, return_run: bool = False):
    """Sample ``num_images`` images with the LoRAs ``loras`` (adapter names on ``unet``) composed by ``method``
    (a registered name or its config, see :func:`list_compositions`).

    ``scheduler``: a diffusers sampler (DDIM / DDPM / DPM-Solver); ``class_label`` None = the null class (the LoRAs
    carry the concepts); ``height``/``width`` default to the UNet's ``sample_size``. Returns images (N, C, H, W) in
    [-1, 1] (and the :class:`Run` with ``return_run``). Raises ConfigError for unknown methods, options or LoRAs.
    """
    config = make_config(method) if isinstance(method, str) else method
    comp = next((c for c in list_compositions() if isinstance(config, c.config_cls)), None)
    if comp is None:
        raise ConfigError(f"{type(config).__name__} is not a registered composition config")
    loras = list(loras)
    _check_loras(unet, loras)
    for name, value in (("num_images", num_images), ("num_inference_steps", num_inference_steps)):
        if value <= 0:
            raise ConfigError(f"{FIELD} must be positive, got {value}", field=name)
    if not math.isfinite(guidance_scale):  # NaN > 1 is False: guidance was silently off
        raise ConfigError(f"guidance_scale must be a finite number (> 1 to use guidance), got {guidance_scale}")
    label = NULL_CLASS if class_label is None else int(class_label)
    if not 0 <= label <= NULL_CLASS:
        raise ConfigError(f"class_label must be in 0..{NULL_CLASS - 1} or None, got {class_label}")
    size = unet.config.sample_size
    h, w = size if height is None else height, size if width is None else width
    factor = 2 ** (len(unet.config.block_out_channels) - 1)  # one 2× downsampler between levels
    for name, value in (("height", h), ("width", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
            raise ConfigError(f"{name} must be a positive multiple of {factor} (the UNet halves the image "
                              f"{factor.bit_length() - 1} times), got {value!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_images, unet.config.in_channels, h, w), generator=g)
    scheduler.set_timesteps(num_inference_steps)
    x = x * scheduler.init_noise_sigma
    run = Run(unet, scheduler, loras, torch.full((num_images,), label), guidance_scale, num_inference_steps,
              scheduler.timesteps)
    method_obj = comp.method_cls(config)
    state = adapter_state(unet)
    active = list(state.active)
    try:
        with lora_scaling(unet, loras, config.lora_scale):
            try:
                if hasattr(method_obj, "start"):
                    method_obj.start(run)
                for i, t in enumerate(run.timesteps):
                    eps = method_obj.noise(run, i, t, scheduler.scale_model_input(x, t))
                    x = scheduler_step(scheduler, eps, t, x, g)
            finally:
                if hasattr(method_obj, "finish"):
                    method_obj.finish(run)
    finally:
        if merged_adapters(unet):
            from ..core.model import unmerge_adapter
            unmerge_adapter(unet)
        if active and list(state.active) != active:
            from ..core.model import set_adapter
            set_adapter(unet, active)
    x = x.clamp(-1, 1)
    return (x, run) if return_run else x
