"""``lorakit bench mixtures``: the mixture-of-LoRA-experts evidence, two experiments on the bundled model.

**budget** — multi-task training at matched parameter budgets. Every mixture gives each token an *active*
rank of 8 per adapted layer (top-k experts × expert rank, or k active rank units for SMoRA), and holds about
as many *trainable* parameters as LoRA r=16. So each mixture has two plain-LoRA references: LoRA r=8 (equal
active parameters) and LoRA r=16 (equal trainable parameters). Configurations (α = 2r throughout):

- MixLoRA: shared LoRA r=8 on attention, 5 FFN experts of rank 4, top-2 (paper layout).
- MoLE: LoRA r=8 on attention, 3 FFN experts of rank 8, top-1 (LLaVA-MoLE's sparse mixture).
- MoLA: experts of rank 4 on every linear, top-2, expert counts 2-2-4-4-6-6 over the 6 layers (mean 4;
  "higher layers need more experts").
- SMoRA: one LoRA of rank 16 on every linear, 8 of its 16 rank units active per token; α = 2k = 16 (SMoRA scales
  by α / k, the active rank, as LoRA by α / r).

The exact trainable counts (routers included) are in the table; the routers are what makes some of them
larger than LoRA r=16 (SMoRA's router has one row per rank unit, as large as A).

**compose** — adapters trained one per task, then combined without retraining them: each adapter alone,
the oracle (each task served by its own adapter: needs the task label at test time), the linear merge
(ΔW = Σ_i ΔW_i / N, also the plain sum: task arithmetic with λ = 1; ``lorakit.compose.merge_adapters``, all other
merge methods in ``lorakit bench merge``), and the learned combinations that see
no task label at test time: MeteoRA (gate only, supervised by the task labels in training, top-2) and
X-LoRA (scaling head on a first pass, adapters frozen); and MixDA's two stages (one domain adapter per task
trained with its rows, then the gate over [domains..., FFN] trained with no keys). The merges are exact (one
adapter holding Σ w_i ΔW_i).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import save_figure


@dataclass
class MixturesProfile:
    tasks: str = "reverse,rotate,sort,upper"
    steps: int = 200  # multi-task training steps (budget) and gate/head training steps (compose)
    task_steps: int = 150  # per-task adapter training steps (compose)
    batch_size: int = 16
    lr: float = 2e-3
    train_examples: int = 1000  # per task
    eval_examples: int = 50  # per task
    seeds: tuple[int, ...] = (0, 1, 2)
    experiments: tuple[str, ...] = ("budget", "compose")


QUICK = MixturesProfile(steps=2, task_steps=2, batch_size=4, train_examples=8, eval_examples=2, seeds=(0,),
                        tasks="reverse,upper")
FULL = MixturesProfile()


def budget_configs() -> dict[str, object]:
    """Row label -> adapter config; see the module docstring for the matching."""
    import lorakit as lk
    from ..methods.mixlora import MixLoraConfig
    from ..methods.mola import MolaConfig
    from ..methods.mole import MoleConfig
    from ..methods.smora import SmoraConfig

    return {
        "lora r=8 (= active)": lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "lora r=16 (= trainable)": lk.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        "mixlora 5×r4 top-2": MixLoraConfig(r=8, lora_alpha=16, expert_r=4, expert_lora_alpha=8, num_experts=5, top_k=2),
        "mole 3×r8 top-1": MoleConfig(r=8, lora_alpha=16, num_experts=3),
        "mola 2-2-4-4-6-6×r4 top-2": MolaConfig(r=4, lora_alpha=8, num_experts=[2, 2, 4, 4, 6, 6], top_k=2,
                                               target_modules="all-linear"),
        "smora r16 top-8": SmoraConfig(r=16, top_k=8, lora_alpha=16, target_modules="all-linear"),
    }


def _train_config(profile: MixturesProfile, steps: int, seed: int):
    from ..training import TrainConfig

    return TrainConfig(steps=steps, batch_size=profile.batch_size, lr=profile.lr,
                       warmup_ratio=0.1 if steps >= 10 else 0.0, lr_schedule="cosine", seed=seed, max_length=128)


def _score(model, tokenizer, examples) -> dict:
    from ..data import evaluate_examples

    r = evaluate_examples(model, tokenizer, examples)
    return {"exact_match": r["exact_match"], "per_task": {k: v["exact_match"] for k, v in r["per_task"].items()}}


def run_budget(profile: MixturesProfile, base, tokenizer, progress: bool = False) -> list[dict]:
    import lorakit as lk
    from ..data import load_examples
    from ..training import train

    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    runs = []
    for seed in profile.seeds:
        train_ex = load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed)
        for label, config in budget_configs().items():
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            lk.add_adapter(model, copy.deepcopy(config))
            trainable, _ = lk.trainable_parameters(model)
            t0 = time.perf_counter()
            result = train(model, tokenizer, train_ex, _train_config(profile, profile.steps, seed), progress=progress)
            wall = time.perf_counter() - t0
            runs.append({"row": label, "method": lk.get_method(config).name, "seed": seed,
                         "trainable_params": trainable, "s_per_step": wall / profile.steps,
                         "final_loss": result.losses[-1], **_score(model, tokenizer, eval_ex)})
    return runs


def run_compose(profile: MixturesProfile, base, tokenizer, workdir: Path, progress: bool = False) -> list[dict]:
    import lorakit as lk
    from ..compose import merge_adapters
    from ..data import load_examples
    from ..methods.meteora import MeteoraConfig
    from ..methods.mixda import MixdaConfig, set_mixda_stage
    from ..methods.xlora import XLoraConfig
    from ..training import train

    tasks = profile.tasks.split(",")
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    runs = []
    for seed in profile.seeds:
        train_mix = load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed)
        paths = []
        for task in tasks:  # one plain LoRA per task, trained on that task alone
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
            train(model, tokenizer, load_examples(task, "train", n=profile.train_examples, seed=seed),
                  _train_config(profile, profile.task_steps, seed), progress=progress)
            path = workdir / f"seed{seed}" / task
            lk.save_adapter(model, path)
            paths.append(path)
            runs.append({"row": f"adapter '{task}' alone", "seed": seed, **_score(model, tokenizer, eval_ex)})

        # Oracle: every test example served by the adapter of its own task.
        per_task = {t: r["per_task"][t] for t, r in zip(tasks, runs[-len(tasks):])}
        runs.append({"row": "oracle (own adapter per task)", "seed": seed, "per_task": per_task,
                     "exact_match": statistics.mean(per_task.values())})

        for label, weight in (("linear merge (mean)", 1.0 / len(tasks)), ("task arithmetic (sum)", 1.0)):
            merged = merge_adapters(paths, [weight] * len(tasks), "linear", model=copy.deepcopy(base))
            model = copy.deepcopy(base)
            lk.load_adapter(model, merged.save(workdir / f"seed{seed}" / label.split()[0]))
            runs.append({"row": label, "seed": seed, **_score(model, tokenizer, eval_ex)})

        strs = [str(p) for p in paths]
        meteora = MeteoraConfig(adapter_paths=strs, top_k=2, task_to_adapter={t: i for i, t in enumerate(tasks)})
        learned = {  # label -> (config, learning-rate multiplier)
            "meteora gate top-2 (task-supervised)": (meteora, 1.0),
            # The paper's N(0, 1) gate barely moves at the shared lr in 200 steps; the table's routing column
            # (decisions that pick the example's own task adapter) shows how much a 10x gate lr changes that.
            "meteora gate top-2, lr ×10": (meteora, 10.0),
            "x-lora scalings (frozen adapters)": (XLoraConfig(adapter_paths=strs), 1.0),
        }
        for label, (config, lr_scale) in learned.items():
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            lk.add_adapter(model, copy.deepcopy(config))
            trainable, _ = lk.trainable_parameters(model)
            config = replace(_train_config(profile, profile.steps, seed), lr=profile.lr * lr_scale)
            train(model, tokenizer, train_mix, config, progress=progress)
            runs.append({"row": label, "seed": seed, "trainable_params": trainable, **_score(model, tokenizer, eval_ex),
                         "routed_to_own_task": routing_accuracy(model, tokenizer, eval_ex, tasks)})

        # MixDA's two stages on the same budget of steps: one domain adapter per task (knowledge stage, rows
        # routed to their task's adapter by the key), then the gate over [domains..., FFN] (task stage, no keys).
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        lk.add_adapter(model, MixdaConfig(num_experts=len(tasks), key_to_domain={t: i for i, t in enumerate(tasks)},
                                          reduction=4))
        train(model, tokenizer, train_mix, _train_config(profile, profile.task_steps, seed), progress=progress)
        set_mixda_stage(model, "default", "task")
        trainable, _ = lk.trainable_parameters(model)
        train(model, tokenizer, train_mix, _train_config(profile, profile.steps, seed), progress=progress)
        runs.append({"row": "mixda two stages (gate over domain adapters)", "seed": seed,
                     "trainable_params": trainable, **_score(model, tokenizer, eval_ex)})
    return runs


def routing_accuracy(model, tokenizer, examples, tasks: list[str], per_task: int = 10) -> float | None:
    """Fraction of (token, layer) routing decisions whose top-weighted expert is the adapter of the example's own
    task (expert i = ``tasks[i]``), over prompt + completion of ``per_task`` examples per task; None when the
    model's mixture layers do not have one expert per task."""
    from ..mixtures import record_routing

    hits = total = 0
    counts = dict.fromkeys(tasks, 0)
    with torch.no_grad():
        for ex in examples:
            if counts.get(ex.task, per_task) >= per_task:
                continue
            counts[ex.task] += 1
            ids = torch.tensor([tokenizer.encode(ex.prompt + ex.completion)])
            with record_routing(model) as traces:
                model(input_ids=ids)
            for records in traces.values():
                for rec in records:
                    if rec["weights"].shape[-1] != len(tasks):
                        return None
                    top = rec["weights"].argmax(-1)
                    hits += int((top == tasks.index(ex.task)).sum())
                    total += top.numel()
    return hits / total if total else None


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["row"], []).append(r)
    rows = []
    for label, rs in groups.items():
        scores = [r["exact_match"] for r in rs]
        tasks = sorted(rs[0]["per_task"])
        row = {"row": label, "seeds": len(rs), "mean": statistics.mean(scores),
               "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "per_task": {t: statistics.mean(r["per_task"][t] for r in rs) for t in tasks}}
        for key, stat in (("trainable_params", statistics.median_low), ("s_per_step", statistics.median),
                          ("routed_to_own_task", statistics.mean)):
            if rs[0].get(key) is not None:
                row[key] = stat(r[key] for r in rs)
        rows.append(row)
    return rows


def run_mixtures(profile: MixturesProfile, progress: bool = False, workdir: str | None = None) -> dict:
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(None)
    before = _score(base, tokenizer, load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234))
    result: dict = {"profile": asdict(profile), "before": before}
    if "budget" in profile.experiments:
        runs = run_budget(profile, base, tokenizer, progress)
        result["budget"] = {"runs": runs, "table": summarise(runs)}
    if "compose" in profile.experiments:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            runs = run_compose(profile, base, tokenizer, Path(tmp), progress)
        result["compose"] = {"runs": runs, "table": summarise(runs)}
    return result


# Profile fields that make runs comparable: files that differ in one of them cannot be pooled.
_POOLED_PROFILE = ("tasks", "steps", "task_steps", "batch_size", "lr", "train_examples", "eval_examples", "experiments")


def combine_results(results: list[dict], names: list[str] | None = None) -> dict:
    """One result from saved ``bench mixtures`` runs of the same settings, e.g. one per seed (``--seeds N``):
    each experiment's runs concatenated and re-summarised (mean ± sd over all seeds). Raises ConfigError naming
    the file for one that is not a ``bench mixtures`` result, whose settings (``_POOLED_PROFILE``) or untrained
    score differ from the first file's, or that holds a seed an earlier file already has."""
    from ..core.errors import ConfigError
    from .pooling import check_poolable

    names = check_poolable(results, names, bench="mixtures", is_result=lambda r: any(k in r for k in ("budget", "compose")),
                           needs="profile, before, budget or compose", keys=_POOLED_PROFILE, also_has=("seeds",),
                           differ="its settings differ", why="the seeds would not be comparable",
                           score=lambda before: before["exact_match"])
    first = results[0]
    seen: dict[int, str] = {}
    for where, r in zip(names, results):
        for seed in r["profile"]["seeds"]:
            if seed in seen:
                raise ConfigError(f"{where}: seed {seed} is also in {seen[seed]}; pool each seed once")
            seen[seed] = where
    out: dict = {"profile": {**first["profile"], "seeds": sorted(seen)}, "before": first["before"],
                 "machine": first.get("machine", {}),
                 "combined_from": [{"file": where, "command": r.get("command"), "seeds": list(r["profile"]["seeds"])}
                                   for where, r in zip(names, results)]}
    for part in first["profile"]["experiments"]:
        runs = [run for r in results for run in r.get(part, {}).get("runs", [])]
        out[part] = {"runs": runs, "table": summarise(runs)}
    return out


def mixtures_markdown(result: dict) -> str:
    p = result["profile"]
    tasks = p["tasks"].split(",")
    lines = [f"Tasks `{p['tasks']}` ({p['train_examples']} training and {p['eval_examples']} test examples each), "
             f"batch {p['batch_size']}, lr {p['lr']}, cosine; seeds {list(p['seeds'])}; exact match on the held-out "
             f"test set (mean ± sd over seeds). Base model before training: {result['before']['exact_match']:.3f}.", ""]
    if result.get("combined_from"):
        lines += ["Combined from one run per file (`--combine`; s/step is each run's own and depends on the machine's "
                  "load then):", ""]
        lines += [f"- `{c['file']}` (seeds {c['seeds']}): `{c['command']}`" for c in result["combined_from"]]
        lines.append("")

    def table(rows, extra=()):
        cols = ["configuration", "exact match", *tasks, *(h for h, _ in extra)]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [f"{r['mean']:.3f} ± {r['sd']:.3f}"] + [f"{r['per_task'].get(t, float('nan')):.2f}" for t in tasks]
            cells += [fn(r) for _, fn in extra]
            out.append(f"| {r['row']} | " + " | ".join(cells) + " |")
        return out

    if "budget" in result:
        rows = result["budget"]["table"]
        ref = next((r for r in rows if r["row"].startswith("lora r=16")), None)
        lines += [f"## Equal budgets: {p['steps']} multi-task steps", "",
                  "Active rank per adapted layer is 8 for every mixture (= LoRA r=8); trainable parameters are "
                  "close to LoRA r=16 (ratio in the last column).", ""]
        lines += table(rows, extra=(("trainable (× LoRA r=16)", lambda r: f"{r['trainable_params']:,} "
                                     f"({r['trainable_params'] / ref['trainable_params']:.2f}×)" if ref else ""),
                                    ("s/step", lambda r: f"{r['s_per_step']:.3f}")))
        lines.append("")
    if "compose" in result:
        lines += [f"## Composing per-task adapters ({p['task_steps']} steps each, LoRA r=8 all-linear); "
                  f"MeteoRA / X-LoRA trained {p['steps']} multi-task steps", ""]
        lines += table(result["compose"]["table"], extra=(("tokens routed to own task's adapter", lambda r: (
            f"{r['routed_to_own_task']:.2f}" if "routed_to_own_task" in r else "")),))
        lines.append("")
    return "\n".join(lines)


def plot_mixtures(result: dict, out_dir: Path) -> Path:
    """``mixtures.png``: exact match (mean ± sd over seeds) per configuration, one panel per experiment, the
    untrained base model as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("budget", "compose") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = result[part]["table"]
        ax.barh([r["row"] for r in rows], [r["mean"] for r in rows], xerr=[r["sd"] for r in rows], capsize=3,
                color="#4c72b0")
        ax.axvline(result["before"]["exact_match"], color="grey", linestyle="--", label="base model (before)")
        ax.invert_yaxis()
        ax.set_xlabel(f"exact match (seeds {result['profile']['seeds']})")
        ax.set_title({"budget": "equal budgets", "compose": "composing per-task adapters"}[part])
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = out_dir / "mixtures.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
