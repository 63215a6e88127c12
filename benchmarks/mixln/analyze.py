"""Per-layer gradient norms and layer-removal importance of the Pre-LN, Post-LN and Mix-LN small bases.

    PYTHONPATH=src python benchmarks/mixln/analyze.py runs/pretrain-small benchmarks/mixln

Reads ``<runs>/{pre,post,mix}`` (made by benchmarks/mixln/pretrain.sh), rebuilds each run's held-out blocks
exactly as ``pretrain_base`` split them (same corpus, tokenizer, seed), and writes ``results.json``,
``results.md`` and ``layers.png`` to the output folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit  # noqa: F401  (registers lorakit-mixln)
from lorakit.pretrain.corpus import CorpusConfig, build_corpus
from lorakit.pretrain.layer_stats import layer_grad_norms, layer_importance
from lorakit.pretrain.train import pack_corpus

RUNS = ("pre", "post", "mix")
BATCH = 8


def eval_blocks(folder: Path) -> torch.Tensor:
    info = json.loads((folder / "pretrain_info.json").read_text())
    config = info["config"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = pack_corpus(build_corpus(CorpusConfig(**config["corpus"])), tokenizer, config["seq_len"], config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])
    order = torch.randperm(len(blocks), generator=generator)
    return blocks[order[: info["corpus"]["eval_blocks"]]]  # (N, T), the blocks pretraining never trained on


def main(runs: Path, out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks = eval_blocks(runs / "pre")
    batches = [blocks[i: i + BATCH] for i in range(0, len(blocks) - BATCH + 1, BATCH)]
    results = {}
    for name in RUNS:
        model = AutoModelForCausalLM.from_pretrained(runs / name)
        info = json.loads((runs / name / "pretrain_info.json").read_text())
        stats = layer_importance(model, batches)
        stats["grad_norm"] = layer_grad_norms(model, batches)
        stats.update(model_type=model.config.model_type, eval_loss=info["eval_loss"], final_loss=info["final_loss"],
                     post_ln_layers=getattr(model.config, "num_post_ln_layers", 0), steps=info["steps"],
                     n_params=info["n_params"])
        results[name] = stats
        print(name, json.dumps({k: v for k, v in stats.items() if not isinstance(v, list)}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    results["eval_batches"] = len(batches)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "layers.png")


def markdown(results: dict) -> str:
    n_layers = len(results["pre"]["grad_norm"])
    head = "| layer | " + " | ".join(f"{k} grad norm" for k in RUNS) + " | " + \
        " | ".join(f"{k} loss change without it" for k in RUNS) + " |\n"
    rows = [head, "|" + "---|" * (1 + 2 * len(RUNS)) + "\n"]
    for i in range(n_layers):
        cells = [f"{results[k]['grad_norm'][i]:.4f}" for k in RUNS]
        cells += [f"{100 * results[k]['loss_change'][i]:+.1f}%" for k in RUNS]
        rows.append(f"| {i} | " + " | ".join(cells) + " |\n")
    summary = ["\n| model | Post-LN layers | eval loss (pretraining held-out) | loss here | mean loss change "
               "without one layer | min over layers | mean output change |\n", "|---|---|---|---|---|---|---|\n"]
    for k in RUNS:
        r = results[k]
        summary.append(f"| {k} | {r['post_ln_layers']} | {r['eval_loss']} | {r['loss']:.4f} | "
                       f"{100 * sum(r['loss_change']) / n_layers:+.1f}% | {100 * min(r['loss_change']):+.1f}% | "
                       f"{sum(r['output_change']) / n_layers:.3f} |\n")
    return "".join(rows + summary)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in RUNS:
        layers = range(len(results[k]["grad_norm"]))
        axes[0].plot(layers, results[k]["grad_norm"], marker="o", label=k)
        axes[1].plot(layers, [100 * v for v in results[k]["loss_change"]], marker="o", label=k)
    axes[0].set(xlabel="layer", ylabel="gradient L2 norm", title="per-layer gradient norm (held-out blocks)")
    axes[1].set(xlabel="layer removed", ylabel="loss change (%)", title="loss change when the layer is removed")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
