"""Controls for the held-out row of run.py: adapters generated for the *other* tasks and the neighbours'
originals scored on the held-out task, reconstruction error per tensor kind, and how far the originals are apart.

    python benchmarks/icmlora/controls.py --collection runs/icmlora/collection --out runs/icmlora/final
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import evaluate, kind_of  # noqa: E402

from lorakit.compose.icm_lora import relative_errors  # noqa: E402
from lorakit.compose.icm_lora_generator import IcmLoraGenerator, read_collection  # noqa: E402
from lorakit.hub import load_model_and_tokenizer  # noqa: E402


def mean_by_kind(a: dict, b: dict, keys: list[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for k in keys:
        groups.setdefault(kind_of(k), []).append(relative_errors(a, b, [k])[1])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", required=True)
    p.add_argument("--out", required=True, help="the --out folder of run.py")
    p.add_argument("--train-tasks", nargs="+", default=["rotate", "rotate2", "rotate4"])
    p.add_argument("--heldout", default="rotate3")
    p.add_argument("--steps", nargs="+", type=int, default=[150, 200, 250, 300])
    p.add_argument("--eval-examples", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    root, out = Path(args.collection), Path(args.out)
    model, tokenizer = load_model_and_tokenizer(None)
    tasks = [*args.train_tasks, args.heldout]
    res = {f"{args.heldout}_test_with_generated_for": {
        t: evaluate(model, tokenizer, out / "generated" / f"{t}-generated_T1", args.heldout, args.eval_examples)
        for t in tasks}}
    gen = IcmLoraGenerator.load(out / "generator")
    keys = gen.layout.keys
    samples, _ = read_collection([str(root / f"{t}-s0" / f"checkpoint-{s}") for t in args.train_tasks for s in args.steps])
    per_kind: dict[str, list[float]] = {}
    for s in samples:
        for k, v in mean_by_kind(s.tensors, gen.reconstruct(s.tensors, s.task), keys).items():
            per_kind.setdefault(k, []).append(v)
    res["recon_rel_err_per_kind"] = {k: sum(v) / len(v) for k, v in per_kind.items()}
    last = f"checkpoint-{max(args.steps)}"
    orig = {t: read_collection([str(root / f"{t}-s0" / last)])[0][0].tensors for t in tasks}
    res[f"original_{args.heldout}_vs_other_originals_rel_err"] = {
        t: relative_errors(orig[args.heldout], orig[t], keys)[1] for t in args.train_tasks}
    res[f"original_{args.heldout}_vs_{args.train_tasks[1]}_by_kind"] = mean_by_kind(
        orig[args.heldout], orig[args.train_tasks[1]], keys)
    print(json.dumps(res, indent=2))
    (out / "controls.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
