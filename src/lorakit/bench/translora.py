"""Trans-LoRA benchmark: move a task LoRA from one bundled base to the other without its training data.

Per task and seed, on the built-in tasks' held-out test split (exact match, greedy):

- source base alone, and the source LoRA (trained on ``train_examples`` real examples) on the source base;
- target base alone, a target LoRA trained on the same real data (the upper reference: what retraining with
  the data would give), and the Trans-LoRA target LoRA (``lorakit.compose.translora.transfer``: only
  ``n_seeds`` real examples and a discriminator trained on ``real_examples`` of them on the source side).

Run: ``python -m lorakit.bench.translora --output benchmarks/translora`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..cli_parser import CommandParser
from ..core.errors import ConfigError
from ..core.threads import NUM_THREADS_HELP, resolve_num_threads

COLUMNS = ("source_base", "source_lora", "target_base", "target_lora_real", "target_lora_translora")


@dataclass
class Profile:
    tasks: tuple[str, ...] = ("reverse", "rotate")
    seeds: tuple[int, ...] = (0,)
    source: str = "bundled"
    target: str = "bundled-small"
    train_examples: int = 400
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 8
    eval_examples: int = 100
    real_examples: int = 100
    n_synthetic: int = 100
    candidates_per_round: int = 128
    max_rounds: int = 10
    max_new_tokens: int = 32
    disc_steps: int = 80
    distill: str = "completions"
    generator: str = "target"


QUICK = Profile(tasks=("reverse",), train_examples=32, steps=4, eval_examples=8, real_examples=16, n_synthetic=8,
                candidates_per_round=16, max_rounds=2, disc_steps=4)


def _train_lora(model_name: str, tokenizer, examples, profile: Profile, seed: int, out: Path):
    from .. import LoraConfig, add_adapter, save_adapter
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train

    model, tokenizer = load_model_and_tokenizer(model_name)
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(r=profile.r, lora_alpha=2 * profile.r, target_modules="all-linear"))
    train(model, tokenizer, examples, TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                                                  seed=seed, output_dir=None, lr_schedule="cosine"), progress=False)
    save_adapter(model, out)
    return model, tokenizer


def _scores(model, tokenizer, test) -> tuple[float, float]:
    """(exact match, letter accuracy) of greedy answers on ``test``, from one generation pass."""
    from ..data import evaluate_examples

    metrics = evaluate_examples(model, tokenizer, test, return_predictions=True)
    letters = sum(letter_accuracy(p, ex.completion) for p, ex in zip(metrics["predictions"], test)) / len(test)
    return round(metrics["exact_match"], 4), round(letters, 4)


def letter_accuracy(prediction: str, reference: str) -> float:
    """Share of the reference's space-separated symbols that the prediction has at the same position (a graded
    companion to exact match for the letter tasks; ours, not the paper's)."""
    ref, pred = reference.split(), prediction.split()
    return sum(a == b for a, b in zip(ref, pred)) / max(len(ref), len(pred), 1)


def rescore(profile: Profile, output: Path, log=print) -> list[dict]:
    """Exact match and letter accuracy of every column from the adapters a run saved under ``output/adapters``."""
    from .. import load_adapter
    from ..data import get_task
    from ..hub import load_model_and_tokenizer

    rows = json.loads((output / "results.json").read_text())["rows"]
    for row in rows:
        test = get_task(row["task"]).generate("test", profile.eval_examples, seed=0)
        folder = output / "adapters" / f"{row['task']}-seed{row['seed']}"
        for column, model_name, adapter in (("source_base", profile.source, None), ("source_lora", profile.source, "source"),
                                            ("target_base", profile.target, None),
                                            ("target_lora_real", profile.target, "target-real"),
                                            ("target_lora_translora", profile.target, "target-translora")):
            model, tokenizer = load_model_and_tokenizer(model_name)
            if adapter:
                load_adapter(model, folder / adapter)
            row[column], row[column + "_letters"] = _scores(model, tokenizer, test)
        log(json.dumps(row))
    _write(output, profile, rows)
    return rows


def run(profile: Profile, output: Path, log=print) -> dict:
    from .. import load_adapter
    from ..compose.translora import TransLoraConfig, transfer
    from ..data import get_task
    from ..hub import load_model_and_tokenizer

    rows = []
    for task in profile.tasks:
        test = get_task(task).generate("test", profile.eval_examples, seed=0)
        base_scores = {}
        for which in ("source", "target"):
            model, tokenizer = load_model_and_tokenizer(getattr(profile, which))
            base_scores[f"{which}_base"], base_scores[f"{which}_base_letters"] = _scores(model, tokenizer, test)
        for seed in profile.seeds:
            start = time.perf_counter()
            real = get_task(task).generate("train", profile.train_examples, seed=seed)
            row = {"task": task, "seed": seed, **base_scores}
            folder = output / "adapters" / f"{task}-seed{seed}"
            model, tokenizer = _train_lora(profile.source, None, real, profile, seed, folder / "source")
            row["source_lora"], row["source_lora_letters"] = _scores(model, tokenizer, test)
            model, tokenizer = _train_lora(profile.target, None, real, profile, seed, folder / "target-real")
            row["target_lora_real"], row["target_lora_real_letters"] = _scores(model, tokenizer, test)
            t0 = time.perf_counter()
            config = TransLoraConfig(n_synthetic=profile.n_synthetic, disc_steps=profile.disc_steps,
                                     candidates_per_round=profile.candidates_per_round, max_rounds=profile.max_rounds,
                                     max_new_tokens=profile.max_new_tokens,
                                     steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed,
                                     distill=profile.distill, generator=profile.generator)
            result = transfer(folder / "source", profile.source, profile.target, real[: profile.real_examples],
                              folder / "target-translora", config)
            row["transfer_s"] = round(time.perf_counter() - t0, 1)
            model, tokenizer = load_model_and_tokenizer(profile.target)
            load_adapter(model, folder / "target-translora")
            row["target_lora_translora"], row["target_lora_translora_letters"] = _scores(model, tokenizer, test)
            row.update({k: v for k, v in result.summary().items() if k in ("candidates", "kept", "keep_rate")})
            row["discriminator_train_accuracy"] = result.discriminator["train_accuracy"]
            row["wall_s"] = round(time.perf_counter() - start, 1)
            log(json.dumps(row))
            rows.append(row)
            _write(output, profile, rows)
    return {"rows": rows}


def merge(parts: Sequence[Path], output: Path) -> list[dict]:
    """Join the rows of runs written to ``parts`` (e.g. one process per task) into ``output``'s results.json/.md.

    Raises ValueError when the parts were run with different profiles (other than their tasks and seeds)."""
    loaded = [json.loads((part / "results.json").read_text()) for part in parts]
    differs = lambda a, b: {k for k in a if k not in ("tasks", "seeds") and a[k] != b.get(k)}  # noqa: E731
    for part, run_ in zip(parts, loaded):
        if bad := differs(loaded[0]["profile"], run_["profile"]):
            raise ValueError(f"{part} was run with another profile ({sorted(bad)}); merge only runs of one profile")
    rows = sorted((r for run_ in loaded for r in run_["rows"]), key=lambda r: (r["task"], r["seed"]))
    fields = {f.name for f in dataclasses.fields(Profile)}
    profile = Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in loaded[0]["profile"].items()
                         if k in fields})
    profile = dataclasses.replace(profile, tasks=tuple(dict.fromkeys(r["task"] for r in rows)),
                                  seeds=tuple(sorted({r["seed"] for r in rows})))
    _write(output, profile, rows)
    return rows


def _mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean().item():.2f} ± {t.std().item() if len(values) > 1 else 0.0:.2f}"


def _write(output: Path, profile: Profile, rows: list[dict]) -> None:
    from ..io.files import atomic_write_bytes, atomic_write_json

    machine = {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    atomic_write_json(output / "results.json", {"profile": dataclasses.asdict(profile), "machine": machine,
                                                "rows": rows})
    lines = ["| task | seed | source base | source LoRA | target base | target LoRA, real data | "
             "target LoRA, Trans-LoRA | kept / sampled | disc. train acc | transfer s |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['task']} | {r['seed']} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {r['kept']} / {r['candidates']} | {r['discriminator_train_accuracy']:.2f} "
                       f"| {r['transfer_s']} |")
    if all(c + "_letters" in r for r in rows for c in COLUMNS):
        lines += ["", "Letter accuracy (share of answer symbols right at their position):", "",
                  "| task | seed | source base | source LoRA | target base | target LoRA, real data | "
                  "target LoRA, Trans-LoRA |", "|" + "---|" * 7]
        lines += [f"| {r['task']} | {r['seed']} | " + " | ".join(f"{r[c + '_letters']:.2f}" for c in COLUMNS) + " |"
                  for r in rows]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if any(sum(r["task"] == t for r in rows) > 1 for t in tasks):
        lines += ["", "Mean ± std over seeds (exact match; letter accuracy where recorded):", "",
                  "| task | seeds | source base | source LoRA | target base | target LoRA, real data | "
                  "target LoRA, Trans-LoRA |", "|" + "---|" * 7]
        for t in tasks:
            mine = [r for r in rows if r["task"] == t]
            cells = []
            for c in COLUMNS:
                cell = _mean_std([r[c] for r in mine])
                if all(c + "_letters" in r for r in mine):
                    cell += f" ({_mean_std([r[c + '_letters'] for r in mine])})"
                cells.append(cell)
            lines.append(f"| {t} | {len(mine)} | " + " | ".join(cells) + " |")
    atomic_write_bytes(output / "results.md", ("\n".join(lines) + "\n").encode())


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="python -m lorakit.bench.translora", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("runs/bench/translora"))
    p.add_argument("--quick", action="store_true", help="tiny smoke profile")
    p.add_argument("--num-threads", type=int, default=0, help=f"torch CPU threads ({NUM_THREADS_HELP}; default: 0)")
    p.add_argument("--rescore", action="store_true", help="only re-evaluate the adapters a run saved in --output "
                   "(exact match and letter accuracy)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                   help="only join the results of these run folders (one profile) into --output")
    for f in dataclasses.fields(Profile):
        default = getattr(Profile(), f.name)
        if isinstance(default, tuple):
            p.add_argument("--" + f.name.replace("_", "-"), nargs="+", type=type(default[0]), default=None)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None)
    args = p.parse_args(argv)
    try:
        torch.set_num_threads(resolve_num_threads(args.num_threads))
    except ConfigError as error:
        p.error(str(error))
    given = {f.name: tuple(v) if isinstance(v, list) else v for f in dataclasses.fields(Profile)
             if (v := getattr(args, f.name)) is not None}
    profile = dataclasses.replace(QUICK if args.quick else Profile(), **given)
    if args.merge:
        merge(args.merge, args.output)
    elif args.rescore:
        rescore(profile, args.output)
    else:
        run(profile, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
