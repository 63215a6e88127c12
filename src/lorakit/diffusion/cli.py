"""``lorakit diffusion train-base | train-loras | train-classifier | bench`` and ``lorakit compose-image``."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..cli_parser import CommandParser, DefaultsFormatter, check_output_dir, check_output_file, seed_arg
from ..core.errors import ConfigError, LorakitError
from ..io.files import atomic_write_bytes

DEFAULT_DIR = "diffusion_run"


def image_format(path: str | os.PathLike) -> str:
    """PIL's format name for ``path``'s suffix (``.jpg`` → JPEG); PNG when it has none. ConfigError naming
    ``--out`` for a suffix PIL cannot write."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    writable = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix not in writable:
        raise ConfigError(f"--out {path}: PIL cannot write {suffix!r} images; use one of .png, .jpg, .bmp, .webp "
                          f"(or another of {sorted(writable)}).")
    return writable[suffix]


def _grid_png(images: torch.Tensor, path: str | os.PathLike, nrow: int, scale: int = 4, pad: int = 2) -> Path:
    """Write images (N, 1, H, W) in [-1, 1] as one image grid, ``nrow`` images per row, each upscaled ``scale``×
    (nearest), grey separators; atomic. The format follows ``path``'s suffix (:func:`image_format`; PNG without
    one)."""
    from PIL import Image

    from .data import to_uint8

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = torch.full((rows * cell_h + pad, nrow * cell_w + pad), 128, dtype=torch.uint8)
    pix = to_uint8(images)[..., 0]  # (N, H, W)
    for i in range(n):
        r, c = divmod(i, nrow)
        big = pix[i].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        canvas[pad + r * cell_h: pad + r * cell_h + h * scale, pad + c * cell_w: pad + c * cell_w + w * scale] = big
    path = Path(path)
    data = io.BytesIO()
    Image.fromarray(canvas.numpy()).save(data, format=image_format(path))
    atomic_write_bytes(path, data.getvalue())
    return path


def _parse_region(text: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--region {text!r}: give start_h,start_w,end_h,end_w as fractions")
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--region {text!r}: four numbers start_h,start_w,end_h,end_w")
    return box


def _parse_set(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use key=value (value as JSON, e.g. order='[\"digit3\",\"thick\"]')")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def check_distinct_loras(folders: Sequence[str]) -> None:
    """Raise ConfigError when two ``--lora`` arguments are the same folder or share a folder name (the adapter name
    each is loaded under)."""
    seen: dict[str, str] = {}
    for folder in folders:
        name = Path(folder).name
        if name in seen:
            same = Path(seen[name]).resolve() == Path(folder).resolve()
            raise ConfigError(f"--lora {folder} is given twice; pass each LoRA once." if same else
                              f"--lora {seen[name]} and --lora {folder} would both load as adapter {name!r} (the "
                              "folder name); rename or copy one of the folders.")
        seen[name] = folder


def cmd_compose(args: argparse.Namespace) -> int:
    from ..io.peft_format import check_adapter_folder
    from .model import check_base, load_base, load_loras, sampling_scheduler
    from .sampler import compose_images, make_config

    check_distinct_loras(args.lora)
    image_format(args.out)  # a bad --out suffix or a taken --out fails before sampling, not after
    check_output_file(args.out, "--out", overwrite=args.overwrite)
    check_base(args.base)
    for folder in args.lora:  # a bad folder or weights file fails before the base loads
        check_adapter_folder(folder)
    classifier = None
    if args.classifier:  # a bad classifier fails now, not after the images are sampled and written
        from .classifier import load_classifier
        classifier = load_classifier(args.classifier)
    unet, train_sched = load_base(args.base)
    names = load_loras(unet, args.lora)
    fields = {"lora_scale": args.lora_scale, **_parse_set(args.set)}
    if args.switch_step is not None:
        fields["switch_step"] = args.switch_step
    if args.cache_interval is not None:
        fields["cache_interval"] = args.cache_interval
    if args.region:
        fields["regions"] = args.region
    if args.weights:
        fields["weights"] = args.weights
    config = make_config(args.method, **fields)
    images = compose_images(unet, sampling_scheduler(train_sched, args.scheduler), names, config,
                            num_images=args.num_images, class_label=args.class_label,
                            guidance_scale=args.guidance_scale, num_inference_steps=args.steps, seed=args.seed,
                            height=args.height, width=args.width)
    path = _grid_png(images, args.out, nrow=min(8, args.num_images))
    print(f"{args.method} of {names}: {len(images)} images -> {path}")
    if classifier is not None:
        from .classifier import concept_rates

        rates = concept_rates(classifier, images, names)
        print("concept rates: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    return 0


def compose_parser(prog: str = "lorakit compose-image") -> argparse.ArgumentParser:
    from .methods.cmlora import CMLoRAConfig
    from .methods.switch import SwitchConfig
    from .sampler import list_compositions

    methods = [c.name for c in list_compositions()]
    p = CommandParser(prog=prog, description="compose several LoRAs while sampling images (training-free)",
                      formatter_class=DefaultsFormatter, field_flags={"num_inference_steps": "--steps"})
    p.add_argument("--base", default=f"{DEFAULT_DIR}/base", help="folder written by `lorakit diffusion train-base`")
    p.add_argument("--lora", action="append", required=True, help="a LoRA folder (repeat; PEFT or lorakit format)")
    p.add_argument("--method", default="composite", choices=methods, help="composition method")
    p.add_argument("--num-images", type=int, default=8, help="images sampled (one grid)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"], help="sampler")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (>1 to use it)")
    p.add_argument("--class-label", type=int, default=None, help="digit class to condition on (default: null class)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplies every LoRA's delta")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the initial noise")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the UNet's sample_size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, e.g. twice the height for two "
                   "regions side by side (default: the UNet's sample_size)")
    p.add_argument("--switch-step", type=int, default=None,
                   help=f"switch: steps per LoRA (default: {SwitchConfig.switch_step})")
    p.add_argument("--cache-interval", type=int, default=None, help="cmlora: cache refresh period "
                   f"(default: {CMLoRAConfig.cache_interval})")
    p.add_argument("--region", type=_parse_region, action="append", help="composer (required there): start_h,start_w,"
                   "end_h,end_w per LoRA, fractions of the image")
    p.add_argument("--weights", type=float, nargs="+", help="merge: one weight per LoRA (default: 1.0 each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other method option")
    p.add_argument("--classifier", default=None, help="folder of `lorakit diffusion train-classifier`: print concept "
                   "rates (default: not printed)")
    p.add_argument("--out", default="composed.png",
                   help="image grid of the samples; the format follows the suffix (.png, .jpg, .bmp, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out image")
    p.set_defaults(func=cmd_compose)
    return p


def _cmd_train_base(args) -> int:
    from .model import TrainSpec, UNetSpec, train_base

    check_output_dir(args.out, "--out", overwrite=args.overwrite)
    summary = train_base(args.out, UNetSpec(sample_size=args.size),
                         TrainSpec(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                         overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_train_loras(args) -> int:
    from .model import LoraSpec, TrainSpec, concepts_by_name, default_concepts, load_base, train_concept_loras

    concepts = concepts_by_name(args.concepts) if args.concepts else default_concepts()  # before the base loads
    if Path(args.out).resolve() == Path(args.base).resolve():  # --overwrite would replace the base with its LoRAs
        raise LorakitError(f"--out {args.out} is the --base folder; the LoRAs would replace the base they need. "
                           f"Choose another folder, e.g. {Path(args.base).parent / 'loras'}.")
    check_output_dir(args.out, "--out", overwrite=args.overwrite, reads=[args.base])
    unet, sched = load_base(args.base)
    summary = train_concept_loras(unet, sched, concepts, args.out, LoraSpec(r=args.r, lora_alpha=args.lora_alpha),
                                  TrainSpec(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                                  overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "concepts"}, indent=2))
    return 0


def _cmd_train_classifier(args) -> int:
    from .classifier import train_classifier

    check_output_dir(args.out, "--out", overwrite=args.overwrite)
    _, report = train_classifier(args.out, size=args.size, steps=args.steps, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_bench

    # as `lorakit bench`: a bench refreshes its report in --out (no --overwrite), but a file in the way or an
    # unwritable folder fails now, not after the run
    check_output_dir(args.out, "--out", overwrite=True)
    run_bench(args.run_dir, args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = DefaultsFormatter
    parser = CommandParser(prog="lorakit diffusion", description="a small diffusion model on the bundled "
                           "digits, concept LoRAs, and multi-LoRA composition")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("train-base", help="train the class-conditioned UNet2DModel", formatter_class=fmt,
                       field_flags={"sample_size": "--size"})
    b.add_argument("--out", default=f"{DEFAULT_DIR}/base", help="folder for the trained base (UNet + scheduler)")
    b.add_argument("--size", type=int, default=16, help="image side (the 8×8 digits upscaled)")
    b.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    b.add_argument("--batch-size", type=int, default=32, help="images per step")
    b.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    b.add_argument("--seed", type=seed_arg, default=0, help="seed of the init, noise and batches")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    b.set_defaults(func=_cmd_train_base)
    lo = sub.add_parser("train-loras", help="train concept LoRAs (digit0..digit9, thick, inverted) together",
                        formatter_class=fmt)
    lo.add_argument("--base", default=f"{DEFAULT_DIR}/base", help="folder written by `lorakit diffusion train-base`")
    lo.add_argument("--out", default=f"{DEFAULT_DIR}/loras", help="folder for one LoRA folder per concept")
    lo.add_argument("--concepts", nargs="+", help="subset: digitD names and style names (default: all 12)")
    lo.add_argument("--r", type=int, default=8, help="LoRA rank")
    lo.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (scaling alpha / r)")
    lo.add_argument("--steps", type=int, default=300, help="optimizer steps")
    lo.add_argument("--batch-size", type=int, default=8, help="rows per concept per step")
    lo.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    lo.add_argument("--seed", type=seed_arg, default=0, help="seed of the init, noise and batches")
    lo.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    lo.set_defaults(func=_cmd_train_loras)
    c = sub.add_parser("train-classifier", help="train the concept classifier (the metric)", formatter_class=fmt)
    c.add_argument("--out", default=f"{DEFAULT_DIR}/classifier", help="folder for the classifier")
    c.add_argument("--size", type=int, default=16, help="image side of its training digits")
    c.add_argument("--steps", type=int, default=600, help="optimizer steps")
    c.add_argument("--seed", type=seed_arg, default=0, help="seed of the init and batches")
    c.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in --out")
    c.set_defaults(func=_cmd_train_classifier)
    be = sub.add_parser("bench", help="every method on digit×style and two-digit layouts; writes results.json, tables.md and PNGs",
                        formatter_class=fmt)
    be.add_argument("--run-dir", default=DEFAULT_DIR, help="holds base/, loras/, classifier/")
    be.add_argument("--out", default="benchmarks/diffusion", help="folder for results.json, tables.md and the "
                    "sample grids")
    be.add_argument("--quick", action="store_true", help="fewer pairs and images (a smoke run)")
    be.set_defaults(func=_cmd_bench)
    return parser


def _guarded(parser: CommandParser, argv: Sequence[str]) -> int:
    args = parser.parse_args(list(argv))
    try:  # (lorakit.cli.ErrorsReported is a layer above diffusion: the same report, written here)
        return args.func(args)
    except (LorakitError, ValueError, FileNotFoundError) as e:
        return parser.chosen(args).fail(e)
    except KeyboardInterrupt:  # Ctrl-C: one line and status 130, as every lorakit command (outputs are atomic)
        print(f"\n{parser.chosen(args).prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str]) -> int:
    return _guarded(build_parser(), argv)


def compose_main(argv: Sequence[str]) -> int:
    return _guarded(compose_parser(), argv)
