"""A small latent-free class-conditional diffusion model (diffusers ``UNet2DModel``) and concept LoRAs on it.

The base is trained on the plain digits (:mod:`.data`) with the DDPM ε-prediction loss ("Denoising Diffusion
Probabilistic Models", Ho et al., arXiv:2006.11239, Algorithm 1) and classifier-free guidance's label dropout
("Classifier-Free Diffusion Guidance", Ho & Salimans, arXiv:2207.12598): with probability ``p_uncond`` a label is
replaced by the null class ``NULL_CLASS`` (= 10), so one network gives conditional and unconditional predictions.

Concept LoRAs play the role of the character / style LoRAs of the composition papers: each is trained on the
*null* class, so that the LoRA alone carries its concept, as a Stable Diffusion LoRA carries its character
through its trigger word. A digit LoRA ``digit3`` learns images of the digit 3; a style LoRA ``thick`` learns thick
strokes on all digits. Composing ``digit3`` with ``thick`` should then draw a thick 3, a combination no single LoRA
was trained on (the papers' setting). All LoRAs of a run train at once on one base: each batch row belongs to one
LoRA and ``lorakit.routing(adapter_names=...)`` sends it through that LoRA (one gathered bmm per layer).

LoRA targets (``LORA_TARGETS``) are the UNet's ``nn.Linear`` layers: attention ``to_q/to_k/to_v/to_out.0``, each
ResNet's ``time_emb_proj`` and the time embedding's ``linear_1/linear_2``. Once lorakit adapts ``nn.Conv2d``
(issue 22, Conv2d LoRA) add ``conv1``, ``conv2`` and ``conv_shortcut`` of the ResNets to get SD-style LoRAs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_positive
from ..core.errors import FIELD, AdapterLoadError, ConfigError, LorakitError, did_you_mean
from ..core.model import add_adapter, adapter_parameters, set_adapter
from ..core.routing import routing
from ..io.peft_format import load_adapter, save_adapter
from ..methods.lora import LoraConfig
from ..io.files import TensorFile, atomic_write_json, read_json, write_dir_atomically
from .data import STYLES, apply_styles, check_style, load_digit_images

NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS  # the label of "no class" (classifier-free guidance's unconditional input)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "linear_1", "linear_2"]


@dataclass
class UNetSpec:
    """Shape of the base ``UNet2DModel``: ``block_out_channels`` per level, one ResNet per level, attention in the
    deeper levels and the mid block. Defaults: ~0.2 M parameters, 16×16×1 images."""

    sample_size: int = 16
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if len(self.block_out_channels) < 2:
            raise ConfigError(f"{FIELD} needs at least two levels (the attention blocks are the deeper ones)",
                              field="block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"every {FIELD} entry must divide by norm_num_groups={self.norm_num_groups}",
                              field="block_out_channels")
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ConfigError(f"{FIELD} {self.sample_size} must divide by 2^(levels-1) (one downsample per level)",
                              field="sample_size")


def build_unet(spec: UNetSpec | None = None, *, seed: int = 0) -> nn.Module:
    """A class-conditioned ``diffusers.UNet2DModel`` (11 class embeddings: digits 0-9 and the null class)."""
    from diffusers import UNet2DModel

    spec = spec or UNetSpec()
    levels = len(spec.block_out_channels)
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=spec.sample_size, in_channels=1, out_channels=1, block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_num_groups,
        attention_head_dim=spec.attention_head_dim, num_class_embeds=NUM_DIGITS + 1,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
        up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
    )


def build_scheduler(num_train_timesteps: int = 1000):
    """The training noise schedule (DDPM, cosine betas, "Improved DDPM", arXiv:2102.09672)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2")


def sampling_scheduler(train_scheduler, kind: str = "ddim"):
    """A sampler over the training schedule: ``ddim`` (deterministic, η = 0) or ``ddpm``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kinds = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in kinds:
        raise ConfigError(f"unknown scheduler {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind].from_config(train_scheduler.config)


@dataclass
class TrainSpec:
    """One training run: ``steps`` optimizer steps of ``batch_size`` rows (per LoRA when training LoRAs)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    p_uncond: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{FIELD} must be positive, got {getattr(self, name)}", field=name)
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"{FIELD} must be in [0, 1), got {self.p_uncond}", field="p_uncond")
        check_positive(self, "lr", finite=True)  # torch's "Invalid learning rate" came after the data and the UNet


def _diffusion_loss(unet, scheduler, x0, labels, generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(unet(noisy, t, class_labels=labels).sample, noise)  # DDPM Algorithm 1, ε-prediction


def _optimizer_step(opt, loss, step: int, train, losses: list[float], log_every: int, what: str) -> None:
    """Backward, cosine learning rate, AdamW step; records the loss and logs its mean every ``log_every`` steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _cosine_lr(opt, step, train.steps, train.lr)
    opt.step()
    losses.append(loss.item())
    if log_every and (step + 1) % log_every == 0:
        print(f"{what} step {step + 1}/{train.steps} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)


def _cosine_lr(opt, step: int, total: int, base: float) -> None:
    warm = max(1, total // 20)
    lr = base * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
    for g in opt.param_groups:
        g["lr"] = lr


def _check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """The commands' rule for an output folder, worded for the Python keyword (a non-empty one needs overwrite)."""
    from ..cli_parser import check_output_dir

    check_output_dir(out_dir, "out_dir", overwrite=overwrite, switch="overwrite=True")


def train_base(out_dir: str | os.PathLike, spec: UNetSpec | None = None, train: TrainSpec | None = None,
               *, log_every: int = 500, overwrite: bool = False) -> dict:
    """Train the base UNet on the plain digits; writes ``out_dir/unet`` (diffusers, safetensors),
    ``out_dir/scheduler`` and ``out_dir/base.json`` (specs, final loss, seconds) atomically: into a temp folder
    beside ``out_dir``, renamed over it at the end. Returns that summary. A non-empty ``out_dir`` is a LorakitError
    before any training unless ``overwrite=True`` (as ``lorakit diffusion train-base`` without ``--overwrite``)."""
    _check_out_dir(out_dir, overwrite)
    spec, train = spec or UNetSpec(), train or TrainSpec()
    images, labels = load_digit_images(spec.sample_size)
    unet, scheduler = build_unet(spec, seed=train.seed), build_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(train.seed)
    start, losses = time.perf_counter(), []
    unet.train()
    for step in range(train.steps):
        idx = torch.randint(0, len(images), (train.batch_size,), generator=g)
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=g) < train.p_uncond] = NULL_CLASS
        loss = _diffusion_loss(unet, scheduler, images[idx], y, g)
        _optimizer_step(opt, loss, step, train, losses, log_every, "base")
    unet.eval()
    summary = {"unet": asdict(spec), "train": asdict(train), "final_loss": sum(losses[-100:]) / min(100, len(losses)),
               "seconds": round(time.perf_counter() - start, 1)}

    def write(folder: Path) -> None:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        (folder / "base.json").write_text(json.dumps(summary, indent=2))

    write_dir_atomically(out_dir, write)  # a crash mid-save leaves the previous base whole
    return summary


def check_base(base_dir: str | os.PathLike) -> Path:
    """``base_dir`` when it is a :func:`train_base` folder (has ``unet/``); FileNotFoundError saying how to build it.
    A cheap check, made before the LoRA folders are read; :func:`load_base` checks the files inside."""
    base = Path(base_dir)
    if not (base / "unet").is_dir():
        raise FileNotFoundError(f"{base} has no unet/ folder: build it with `lorakit diffusion train-base --out {base}`")
    return base


def load_base(base_dir: str | os.PathLike) -> tuple[nn.Module, object]:
    """(UNet2DModel in eval mode, DDPM scheduler) from a :func:`train_base` folder. Raises FileNotFoundError (no
    ``unet/``) and LorakitError naming a damaged file (``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors``,
    ``scheduler/scheduler_config.json``) or weights diffusers cannot build the UNet from, saying how to rebuild."""
    from diffusers import DDPMScheduler, UNet2DModel

    base = check_base(base_dir)
    rebuild = f"rebuild it with `lorakit diffusion train-base --out {base}`"
    try:  # named here: diffusers reports these as OSError tracebacks
        read_json(base / "unet" / "config.json")
        TensorFile(base / "unet" / "diffusion_pytorch_model.safetensors")
        read_json(base / "scheduler" / "scheduler_config.json")
    except AdapterLoadError as error:
        raise LorakitError(f"base {base}: {error}; {rebuild}") from None
    try:
        unet = UNet2DModel.from_pretrained(str(base / "unet"), use_safetensors=True).eval()
        scheduler = DDPMScheduler.from_pretrained(str(base / "scheduler"))
    except (OSError, ValueError, RuntimeError) as error:  # diffusers' own checks: weights that fit no config
        raise LorakitError(f"base {base}: {type(error).__name__}: {error}; {rebuild}") from None
    return unet, scheduler


@dataclass
class ConceptSpec:
    """A concept LoRA's training images: the plain images of ``digit`` (None: all digits) with ``styles`` applied."""

    name: str
    digit: int | None = None
    styles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.styles = tuple(self.styles)
        for s in self.styles:
            check_style(s)
        if self.digit is not None and not 0 <= self.digit < NUM_DIGITS:
            raise ConfigError(f"concept {self.name!r}: {FIELD} must be in 0..9, got {self.digit}", field="digit")
        if self.digit is None and not self.styles:
            raise ConfigError(f"concept {self.name!r} is neither a digit nor a style: give digit or styles")


def default_concepts() -> list[ConceptSpec]:
    """One LoRA per digit class (``digit0`` ... ``digit9``) and the style LoRAs ``thick`` and ``inverted``."""
    return [ConceptSpec(f"digit{d}", digit=d) for d in range(NUM_DIGITS)] + [
        ConceptSpec("thick", styles=("thick",)), ConceptSpec("inverted", styles=("inverted",))]


def concepts_by_name(names: list[str] | tuple[str, ...]) -> list[ConceptSpec]:
    """The concepts named: a default concept (``digit0`` ... ``digit9``, ``thick``, ``inverted``) or any style name.

    Raises ConfigError for an unknown name, with near matches and every valid name (``--concepts`` on the CLI)."""
    known = {c.name: c for c in default_concepts()}
    valid = list(known) + [s for s in STYLES if s not in known]
    for name in names:
        if name not in valid:
            raise ConfigError(f"--concepts: unknown concept {name!r}.{did_you_mean(name, valid)} Valid: digit0 ... "
                              f"digit{NUM_DIGITS - 1} (one per digit class) and the styles {', '.join(STYLES)}.")
    return [known[n] if n in known else ConceptSpec(n, styles=(n,)) for n in names]


@dataclass
class LoraSpec:
    r: int = 8
    lora_alpha: float = 16
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules))


def train_concept_loras(unet: nn.Module, scheduler, concepts: list[ConceptSpec], out_dir: str | os.PathLike,
                        lora: LoraSpec | None = None, train: TrainSpec | None = None, *, log_every: int = 200,
                        overwrite: bool = False) -> dict:
    """Train one LoRA per concept on the null class, all at once (each batch holds ``train.batch_size`` rows per
    concept, routed per row). Saves each as a PEFT-format folder ``out_dir/<name>`` plus ``out_dir/loras.json``,
    replacing ``out_dir`` whole and atomically (:func:`~lorakit.io.files.write_dir_atomically`); returns a summary.
    A non-empty ``out_dir`` is a LorakitError before any training unless ``overwrite=True`` (as ``lorakit diffusion
    train-loras`` without ``--overwrite``)."""
    _check_out_dir(out_dir, overwrite)
    lora, train = lora or LoraSpec(), train or TrainSpec(steps=800, batch_size=16, lr=3e-3)
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise ConfigError(f"concept names must be unique, got {names}")
    size = unet.config.sample_size
    images, labels = load_digit_images(size)
    pools = []
    for c in concepts:
        x = images if c.digit is None else images[labels == c.digit]
        pools.append(apply_styles(x, c.styles))
    for n in names:
        add_adapter(unet, lora.config(), n)
    set_adapter(unet, names)  # all trainable; rows pick their LoRA through routing
    params = [p for n in names for p in adapter_parameters(unet, n, trainable_only=True).values()]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(train.seed)
    rows = [n for n in names for _ in range(train.batch_size)]
    start, losses = time.perf_counter(), []
    unet.train()
    for step in range(train.steps):
        x0 = torch.cat([p[torch.randint(0, len(p), (train.batch_size,), generator=g)] for p in pools])
        y = torch.full((x0.shape[0],), NULL_CLASS)
        with routing(adapter_names=rows):
            loss = _diffusion_loss(unet, scheduler, x0, y, g)
        _optimizer_step(opt, loss, step, train, losses, log_every, "lora")
    unet.eval()
    summary = {"concepts": [asdict(c) for c in concepts], "lora": asdict(lora), "train": asdict(train),
               "final_loss": sum(losses[-50:]) / min(50, len(losses)), "seconds": round(time.perf_counter() - start, 1)}

    def write(folder: Path) -> None:
        for n in names:
            save_adapter(unet, folder / n, n)
        atomic_write_json(folder / "loras.json", summary)

    write_dir_atomically(out_dir, write)  # replaces out_dir whole: no old LoRA beside the new ones
    return summary


def load_loras(unet: nn.Module, folders: list[str | os.PathLike], names: list[str] | None = None) -> list[str]:
    """Load LoRA folders (lorakit or PEFT format) onto ``unet``; returns their adapter names (folder names by
    default)."""
    names = names or [Path(f).name for f in folders]
    for folder, name in zip(folders, names):
        try:
            load_adapter(unet, folder, name)
        except LorakitError as error:  # which of several folders it was (its type and field unchanged)
            if error.args and isinstance(error.args[0], str) and str(folder) not in error.args[0]:
                error.args = (f"LoRA folder {folder}: {error.args[0]}", *error.args[1:])
            raise
    return names
