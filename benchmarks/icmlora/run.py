"""ICM-LoRA on the bundled base: train the CVAE generator on a rotate-by-k adapter collection, then measure
reconstruction error and the exact match of generated adapters against the originals, on the training offsets
and on a held-out offset.

    benchmarks/icmlora/collect.sh runs/icmlora/collection rotate rotate2 rotate3 rotate4   # SEEDS=0
    python benchmarks/icmlora/run.py --collection runs/icmlora/collection --out runs/icmlora/result

The collection run folder of task T is COLLECTION/T-s0; its checkpoints at --steps are the training samples
(the held-out task's run is only used as the "original" to compare with, never by the generator).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

import lorakit as lk
from lorakit.compose.icm_lora import CvaeConfig, relative_errors
from lorakit.compose.icm_lora_generator import IcmLoraConfig, generate_adapter, read_collection, train_icm_lora
from lorakit.data import evaluate_examples, load_examples
from lorakit.hub import load_model_and_tokenizer


def evaluate(model, tokenizer, adapter: Path | None, task: str, n: int) -> float:
    examples = load_examples(task, "test", n, seed=0)
    if adapter is None:  # no adapter is attached between calls: this is the base alone
        return evaluate_examples(model, tokenizer, examples, batch_size=25)["exact_match"]
    lk.load_adapter(model, adapter, name="icm")
    try:
        return evaluate_examples(model, tokenizer, examples, batch_size=25)["exact_match"]
    finally:
        lk.delete_adapter(model, "icm")


def layer_of(key: str) -> str:
    found = re.search(r"layers\.(\d+)\.", key)
    return found.group(1) if found else "other"


def kind_of(key: str) -> str:
    """'q_proj.lora_A' for '...layers.3.self_attn.q_proj.lora_A.weight'."""
    parts = key.split(".")
    return ".".join(parts[-3:-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train-tasks", nargs="+", default=["rotate", "rotate2", "rotate4"])
    p.add_argument("--heldout", default="rotate3")
    p.add_argument("--steps", nargs="+", type=int, default=[150, 200, 250, 300])
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", nargs="+", type=int, default=[8, 16, 32, 32, 16, 8])
    p.add_argument("--eval-examples", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    root, out = Path(args.collection), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    final = {t: root / f"{t}-s0" / f"checkpoint-{max(args.steps)}" for t in [*args.train_tasks, args.heldout]}
    specs = [str(root / f"{t}-s0" / f"checkpoint-{s}") for t in args.train_tasks for s in args.steps]
    model, tokenizer = load_model_and_tokenizer(None)

    config = IcmLoraConfig(cvae=CvaeConfig(channels=tuple(args.channels)), epochs=args.epochs, lr=args.lr)
    start = time.perf_counter()
    gen = train_icm_lora(specs, config, model=model, tokenizer=tokenizer,
                         log=lambda r: r["epoch"] % 10 == 0 and print(json.dumps(r), file=sys.stderr, flush=True))
    train_s = time.perf_counter() - start
    gen.save(out / "generator")

    samples, _ = read_collection(specs)
    keys = gen.layout.keys
    recon = {}
    per_layer: dict[str, list[float]] = {}
    per_kind: dict[str, list[float]] = {}
    for s in samples:
        per, overall = relative_errors(s.tensors, gen.reconstruct(s.tensors, s.task), keys)
        recon.setdefault(s.task, []).append(overall)
        for k, v in per.items():
            per_layer.setdefault(layer_of(k), []).append(v)
            per_kind.setdefault(kind_of(k), []).append(v)

    originals = {t: read_collection([str(final[t])])[0][0].tensors for t in final}
    rows = []
    base_em = {t: evaluate(model, tokenizer, None, t, args.eval_examples) for t in final}
    for task in final:
        row = {"task": task, "seen": task != args.heldout, "base": base_em[task],
               "original": evaluate(model, tokenizer, final[task], task, args.eval_examples)}
        if task in recon:
            row["recon_rel_err"] = sum(recon[task]) / len(recon[task])
        for label, temperature in (("generated_T1", 1.0), ("generated_T0", 0.0)):
            folder = generate_adapter(gen, task, out / "generated" / f"{task}-{label}", seed=0,
                                      temperature=temperature, model=model, tokenizer=tokenizer)
            generated = read_collection([f"{task}={folder}"])[0][0].tensors
            row[f"{label}_rel_err"] = relative_errors(originals[task], generated, keys)[1]
            row[label] = evaluate(model, tokenizer, folder, task, args.eval_examples)
        if task == args.heldout:
            row["neighbours"] = {t: evaluate(model, tokenizer, final[t], task, args.eval_examples)
                                 for t in args.train_tasks}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"train_seconds": train_s, "n_samples": len(samples), "input_length": gen.layout.length,
              "cvae_params": sum(p.numel() for p in gen.cvae.parameters()), "config": args.__dict__,
              "final_epoch": gen.history[-1], "recon_rel_err_per_layer": {k: sum(v) / len(v) for k, v in
                                                                         sorted(per_layer.items())},
              "recon_rel_err_per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
