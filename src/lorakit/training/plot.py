"""A plot of a run from its per-step metrics log (``metrics.jsonl``): loss and learning rate by step, and the
evaluations as they happened. matplotlib is optional (``pip install lorakit[bench]``); without it nothing is drawn."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a metrics.jsonl written by ``lorakit train``."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (evals if "eval" in record else train).append(record)
    return train, evals


def plot_metrics(path: str | os.PathLike, output: str | os.PathLike) -> Path | None:
    """Write ``output`` (PNG): loss (log scale) and lr against step, exact match at each evaluation.

    Returns the PNG's path, or None when matplotlib is not installed or the log has no training records.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = read_metrics(path)
    if not train:
        return None
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], color="tab:blue", label="loss")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean since last record)")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:gray", linestyle="--", label="lr")
    ax_lr.set_ylabel("learning rate")
    if evals:
        ax_eval.plot([r["step"] for r in evals], [r["eval"]["exact_match"] for r in evals], marker="o")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel("exact match")
    ax_eval.set_ylim(0, 1)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
