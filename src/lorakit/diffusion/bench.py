"""The composition benchmark: every method on the same LoRA pairs, scored by the concept classifier.

Task A (digit × style): compose a digit LoRA with a style LoRA on a 16×16 canvas; concept 1 = the classifier
reads that digit, concept 2 = it detects that style, "both" = both in the same image. Rows: merge, switch,
composite, cmlora, plus each LoRA alone as references.
Task B (two digits side by side, the LoRA-Composer setting): two digit LoRAs on a 16×32 canvas, left box and right
box; concept 1 / 2 = the left / right half is read as its digit. Rows: composite, merge and composer.
Writes ``results.json`` (settings, both tables, timings), ``tables.md`` (the tables as markdown, for
``benchmarks/diffusion/README.md``) and the sample grids (PNG) into ``out``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io.files import atomic_write_bytes, atomic_write_json
from .classifier import concept_rates, load_classifier
from .cli import _grid_png
from .model import load_base, load_loras, sampling_scheduler
from .sampler import compose_images, make_config

METHODS_A = ["merge", "switch", "composite", "cmlora"]
METHODS_B = ["merge", "composite", "composer"]
HALVES = [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def run_bench(run_dir: str, out: str, *, quick: bool = False, steps: int = 20, seed: int = 0) -> dict:
    run = Path(run_dir)
    unet, train_sched = load_base(run / "base")
    lora_dir = run / "loras"
    digits = [0, 3, 7] if quick else list(range(10))
    styles = ["thick", "inverted"]
    names = load_loras(unet, [lora_dir / f"digit{d}" for d in range(10)] + [lora_dir / s for s in styles])
    clf = load_classifier(run / "classifier")
    sched = sampling_scheduler(train_sched, "ddim")
    n = 4 if quick else 8
    out_dir = Path(out)
    results: dict = {"settings": {"images_per_pair": n, "steps": steps, "scheduler": "ddim", "guidance_scale": 1.0,
                                  "class_label": "null", "digits": digits, "styles": styles, "seed": seed}}
    # Task A: digit × style
    table_a, grid_a, timing = {}, [], {}
    for method in ["single:digit", "single:style", *METHODS_A]:
        per_pair = []
        start = time.perf_counter()
        for d in digits:
            for s in styles:
                pair = [f"digit{d}", s]
                if method.startswith("single:"):
                    loras, cfg = ([pair[0]] if method == "single:digit" else [pair[1]]), make_config("composite")
                else:
                    loras, cfg = pair, make_config(method)
                imgs = compose_images(unet, sched, loras, cfg, num_images=n, num_inference_steps=steps, seed=seed)
                rates = concept_rates(clf, imgs, pair)
                per_pair.append({"concept1": rates[pair[0]], "concept2": rates[s], "both": rates["all"]})
                if d in digits[:3]:
                    grid_a.append(imgs[:4])
        timing[method] = round(time.perf_counter() - start, 1)
        table_a[method] = _mean(per_pair)
        print(f"A {method}: {table_a[method]} ({timing[method]} s)", flush=True)
    rows_a = 2 + len(METHODS_A)
    _grid_png(torch.cat(grid_a), out_dir / "digit_style_grid.png", nrow=len(grid_a) // rows_a * 4)
    # Task B: two digits, left and right
    pairs = [(0, 7), (3, 1), (6, 2)] if quick else [(a, b) for a in range(10) for b in range(10) if a != b][::9]
    table_b, grid_b = {}, []
    for method in METHODS_B:
        per_pair = []
        start = time.perf_counter()
        for a, b in pairs:
            loras = [f"digit{a}", f"digit{b}"]
            cfg = make_config(method, regions=HALVES) if method == "composer" else make_config(method)
            imgs = compose_images(unet, sched, loras, cfg, num_images=n, num_inference_steps=steps, seed=seed,
                                  width=2 * unet.config.sample_size)
            half = imgs.shape[-1] // 2
            left = concept_rates(clf, imgs[..., :half], [loras[0]])
            right = concept_rates(clf, imgs[..., half:], [loras[1]])
            both = (clf.concepts(imgs[..., :half])["digit"] == a) & (clf.concepts(imgs[..., half:])["digit"] == b)
            per_pair.append({"concept1": left[loras[0]], "concept2": right[loras[1]], "both": both.float().mean().item()})
            if len(grid_b) < 3 * len(METHODS_B) and (a, b) in pairs[:3]:
                grid_b.append(imgs[:4])
        timing[f"B:{method}"] = round(time.perf_counter() - start, 1)
        table_b[method] = _mean(per_pair)
        print(f"B {method}: {table_b[method]}", flush=True)
    _grid_png(torch.cat(grid_b), out_dir / "two_digit_grid.png", nrow=12)
    results.update(task_a=table_a, task_b=table_b, task_b_pairs=pairs, seconds=timing)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_bytes(out_dir / "tables.md", tables_markdown(results).encode())
    return results


def tables_markdown(results: dict) -> str:
    """The two result tables as markdown (concept rates in %)."""
    def table(rows: dict, c1: str, c2: str, prefix: str = "") -> list[str]:
        lines = [f"| method | {c1} | {c2} | both | seconds |", "|---|---|---|---|---|"]
        for method, r in rows.items():
            secs = results["seconds"].get(prefix + method, "")
            lines.append(f"| {method} | {100 * r['concept1']:.1f} | {100 * r['concept2']:.1f} | "
                         f"{100 * r['both']:.1f} | {secs} |")
        return lines

    out = ["### A: digit LoRA + style LoRA (16×16)", ""]
    out += table(results["task_a"], "digit shown", "style shown")
    out += ["", "### B: two digit LoRAs, left and right (16×32)", ""]
    out += table(results["task_b"], "left digit", "right digit", "B:")
    return "\n".join(out) + "\n"
