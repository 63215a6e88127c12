"""``lorakit bench methods``: every registered method (and variant) trained on the bundled base model with the
same tasks, data, steps and seeds, reported in one table.

The method list comes from the registry, so a new method appears here by registering it. ``inits`` adds rows
"METHOD+INIT" (e.g. ``lora+pissa``, ``lora_xs+lora_sb``): the method at the same r, trained the same way, its
adapter initialised by a registered init before step 0 (a data-driven one on the run's first ``init_batches``
training batches, as ``lorakit train --init`` does). ``combine_results`` pools saved results of the same profile
(e.g. a re-run of some methods) into one table.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import save_figure
from ..core.errors import LorakitError


@dataclass
class MethodsProfile:
    tasks: str = "reverse,upper,add,lookup"
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 8
    train_examples: int = 1000  # per task
    eval_examples: int = 50  # per task
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = field(default_factory=tuple)  # empty: every registered method
    all_variants: bool = True  # False: each method's first (default) variant only
    procedures: tuple[str, ...] = ()  # training procedures on LoRA, as rows "lora+NAME" (bench/procedures.py)
    full_finetune: bool = False  # a "full" row: every base weight trained by AdamW at full_lr
    full_lr: float = 2e-4
    inits: tuple[str, ...] = ()  # initialisations, as rows "METHOD+INIT" (bench/inits.py's CONTENDERS say which method)
    init_batches: int = 8  # × batch_size training examples a data-driven init sees (8 × 16 = 128, LoRA-GA's example)


QUICK = MethodsProfile(steps=3, batch_size=4, train_examples=20, eval_examples=4, seeds=(0,), tasks="reverse,add")
FULL = MethodsProfile()


def _config_for(method, variant: str, r: int):
    """``method``'s config for the bundled base: ``variant`` of its benchmark variants (``Method.benchmark_variants``)
    with the bench's r, lora_alpha = 2r and all-linear targets where the variant leaves them unset."""
    kwargs = dict(method.benchmark_variants()[variant])
    fields = method.config_cls.__dataclass_fields__
    if "r" in fields:
        kwargs.setdefault("r", r)
    if "lora_alpha" in fields:
        kwargs.setdefault("lora_alpha", 2 * r)
    # Methods with their own default targets (MixLoRA/MoLE: attention + the FFN blocks) keep them.
    if not method.config_cls.has_own_targets():
        kwargs.setdefault("target_modules", "all-linear")
    return method.config_cls(**kwargs)


def _row_vectors(method) -> dict[str, int]:
    """Per-row routing vectors the method reads (name -> size), from its ``example_routing``; built-in tasks give
    each task a fixed random vector of that size ("tasks as users"). Per-token maps cannot be made up for text
    tasks: such methods are skipped."""
    if method.example_routing is None:
        return {}
    probe = torch.zeros(2, 5, dtype=torch.long)
    out = {}
    for name, value in method.example_routing(probe).get("extras", {}).items():
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 2
                and value.shape[0] == 2 and tuple(value.shape) != tuple(probe.shape)):
            raise LorakitError(f"needs routing extras {name!r} per token (e.g. a modality map) that text tasks "
                               "do not carry")
        out[name] = value.shape[1]
    return out


def _with_vectors(examples, vectors: dict[str, int]):
    """``examples`` with each task's fixed vector per name in ``vectors`` (see ``_row_vectors``)."""
    if not vectors:
        return examples
    from dataclasses import replace

    from ..data.tasks import stable_seed

    def vec(task, name, size):
        g = torch.Generator().manual_seed(stable_seed("bench-user", task, name))
        return torch.randn(size, generator=g).tolist()
    table = {(ex.task, n): vec(ex.task, n, d) for ex in examples for n, d in vectors.items()}
    return [replace(ex, routing={n: table[ex.task, n] for n in vectors}) for ex in examples]


def run_methods(profile: MethodsProfile, progress: bool = False, after_each=None) -> dict:
    """The table for ``profile``; ``after_each(result)`` gets the result so far after each method and each init
    (the CLI writes it to ``methods.partial.json``: a stopped run keeps its finished rows, for ``--combine``)."""
    import lorakit as lk
    from ..data import build_task_index, evaluate_examples, load_examples
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train

    base, tokenizer = load_model_and_tokenizer(None)
    train_ex = {s: load_examples(profile.tasks, "train", n=profile.train_examples, seed=s) for s in profile.seeds}
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    before = evaluate_examples(base, tokenizer, eval_ex)

    runs = []

    def so_far() -> dict:
        return {"profile": asdict(profile), "before": before["exact_match"],
                "skipped": sorted({(r["method"], r["variant"], r["skipped"]) for r in runs if "skipped" in r}),
                "before_per_task": {k: v["exact_match"] for k, v in before["per_task"].items()},
                "runs": list(runs), "table": summarise(runs)}

    for method in lk.list_methods():
        if profile.methods and method.name not in profile.methods:
            continue
        if after_each is not None and runs:  # the methods before this one are finished
            after_each(so_far())
        variants = list(method.benchmark_variants())[:None if profile.all_variants else 1]
        for variant in variants:
            for seed in profile.seeds:
                model = copy.deepcopy(base)
                torch.manual_seed(seed)
                try:
                    lk.add_adapter(model, _config_for(method, variant, profile.r))
                    vectors = _row_vectors(method)
                except lk.LorakitError as e:
                    runs.append({"method": method.name, "variant": variant, "seed": seed, "skipped": str(e)})
                    continue
                trainable, _ = lk.trainable_parameters(model)
                config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                                     warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine",
                                     seed=seed, max_length=128)
                t0 = time.perf_counter()
                try:
                    result = train(model, tokenizer, _with_vectors(train_ex[seed], vectors), config, progress=progress)
                except lk.LorakitError as e:  # e.g. a keyed method whose experts do not cover the tasks
                    runs.append({"method": method.name, "variant": variant, "seed": seed, "skipped": str(e)})
                    continue
                wall = time.perf_counter() - t0
                after = evaluate_examples(model, tokenizer, _with_vectors(eval_ex, vectors),
                                          task_to_id=build_task_index(train_ex[seed]))
                runs.append({"method": method.name, "variant": variant, "seed": seed, "trainable_params": trainable,
                             "after": after["exact_match"], "per_task": {k: v["exact_match"] for k, v in after["per_task"].items()},
                             "final_loss": result.losses[-1], "s_per_step": wall / profile.steps,
                             "peak_memory_mb": result.peak_memory_mb})
    for name in profile.inits:
        if after_each is not None and runs:
            after_each(so_far())
        runs += init_runs(profile, name, base, tokenizer, train_ex, eval_ex, progress=progress)
    if profile.procedures or profile.full_finetune:
        from .procedures import procedure_runs
        runs += procedure_runs(profile, base, tokenizer, train_ex, eval_ex, progress=progress)
    return so_far()


def init_method(name: str) -> tuple[str, str]:
    """``"pissa"`` -> ("lora", "pissa"), ``"nlora"`` -> ("slora", "nlora"): the method a bench init row trains and
    the init it runs (``bench/inits.py``'s contenders). ConfigError with near matches for a name that is not one."""
    from ..core.errors import ConfigError, did_you_mean
    from .inits import CONTENDERS

    choices = {init: method for method, kwargs, init, _ in CONTENDERS.values() if init is not None and not kwargs}
    if name not in choices:
        raise ConfigError(f"unknown bench init {name!r}; choose from {sorted(choices)}.{did_you_mean(name, choices)}")
    return choices[name], name


def init_runs(profile: MethodsProfile, name: str, base, tokenizer, train_ex: dict, eval_ex, progress: bool = False
              ) -> list[dict]:
    """Rows ``METHOD+INIT`` for init ``name`` (see ``init_method``), one per seed: the method's config as its own
    row has it (r, α = 2r, all-linear), the same data, steps, lr schedule and seed."""
    import lorakit as lk
    from ..data import evaluate_examples
    from ..training import TrainConfig, train
    from .inits import set_bench_init_options

    method_name, init = init_method(name)
    method = lk.get_method(method_name)
    variant = next(iter(method.benchmark_variants()))
    runs = []
    for seed in profile.seeds:
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                             warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine", seed=seed,
                             max_length=128, init_batches=profile.init_batches)
        set_bench_init_options(model, init, lr=profile.lr, warmup_steps=max(1, config.num_warmup_steps))
        lk.add_adapter(model, _config_for(method, variant, profile.r), init=init)
        t0 = time.perf_counter()
        result = train(model, tokenizer, train_ex[seed], config, progress=progress)  # runs a data-driven init first
        wall = time.perf_counter() - t0
        trainable, _ = lk.trainable_parameters(model)
        after = evaluate_examples(model, tokenizer, eval_ex)
        runs.append({"method": f"{method_name}+{name}", "variant": "init", "seed": seed, "trainable_params": trainable,
                     "after": after["exact_match"], "per_task": {k: v["exact_match"] for k, v in after["per_task"].items()},
                     "final_loss": result.losses[-1], "s_per_step": wall / profile.steps,  # the init's time included
                     "peak_memory_mb": result.peak_memory_mb})
    return runs


# Profile fields that make runs comparable: files that differ in one of them cannot share a table.
_POOLED_PROFILE = ("tasks", "steps", "batch_size", "lr", "r", "train_examples", "eval_examples")


def combine_results(results: list[dict], names: list[str] | None = None) -> dict:
    """One ``bench methods`` result from saved ones of the same profile, e.g. the full table and a re-run of some
    methods (``--methods ...``): runs pooled by (method, variant, seed), a later file's run replacing an earlier
    one's (a re-run after a fix supersedes the old row), and re-summarised. ``combined_from`` lists each file's
    command and rows; ``reruns`` each replaced run with both scores (e.g. LoRA as a control: equal scores show
    the data, seeds and evaluation were the same). Raises ConfigError naming the file for one that is not a
    ``bench methods`` result, or whose profile (``_POOLED_PROFILE``) or untrained score differs from the first's."""
    from .pooling import check_poolable

    names = check_poolable(results, names, bench="methods", is_result=lambda r: isinstance(r.get("runs"), list),
                           needs="profile, runs or before", keys=_POOLED_PROFILE, differ="its profile differs",
                           why="its rows would not be comparable")
    first = results[0]
    pooled: dict[tuple, dict] = {}
    reruns = []
    for where, r in zip(names, results):
        for run in r["runs"]:
            key = (run["method"], run["variant"], run["seed"])
            old = pooled.get(key)
            if old is not None and "after" in old and "after" in run:
                reruns.append({"method": key[0], "variant": key[1], "seed": key[2], "before": old["after"],
                               "after": run["after"], "file": where})
            pooled[key] = run
    runs = list(pooled.values())
    profile = dict(first["profile"])
    profile["seeds"] = sorted({run["seed"] for run in runs})
    profile["methods"] = sorted({run["method"] for run in runs})
    for key in ("procedures", "inits"):
        profile[key] = sorted({x for r in results for x in r["profile"].get(key, ())})
    return {"profile": profile, "before": first["before"], "before_per_task": first.get("before_per_task", {}),
            "skipped": sorted({(r["method"], r["variant"], r["skipped"]) for r in runs if "skipped" in r}),
            "runs": runs, "table": summarise(runs), "reruns": reruns, "machine": first.get("machine", {}),
            "combined_from": [{"file": where, "command": r.get("command"),
                               "rows": sorted({run["method"] for run in r["runs"]})}
                              for where, r in zip(names, results)]}


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if "skipped" in r:
            continue
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    ref = {r["seed"]: r for r in groups.get(("lora", "lora"), [])}
    ref_params = next(iter(ref.values()))["trainable_params"] if ref else None
    rows = []
    for (method, variant), rs in groups.items():
        scores = [r["after"] for r in rs]
        row = {"method": method, "variant": variant, "seeds": len(rs), "seed_list": [r["seed"] for r in rs],
               "after_mean": statistics.mean(scores),
               "after_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "trainable_params": rs[0]["trainable_params"],
               "s_per_step": statistics.median(r["s_per_step"] for r in rs),
               "peak_memory_mb": max(r["peak_memory_mb"] for r in rs),
               "final_loss": statistics.mean(r["final_loss"] for r in rs)}
        if ref:  # against LoRA on the same seeds where it has them (a row of fewer seeds, e.g. a partial run)
            same = [ref[r["seed"]]["after"] for r in rs if r["seed"] in ref]
            row["vs_lora"] = row["after_mean"] - statistics.mean(same if len(same) == len(rs) else
                                                                 [x["after"] for x in ref.values()])
            row["params_vs_lora"] = row["trainable_params"] / ref_params
        rows.append(row)
    return sorted(rows, key=lambda r: -r["after_mean"])


def methods_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Tasks `{p['tasks']}`, {p['steps']} steps × batch {p['batch_size']}, lr {p['lr']}, r={p['r']} "
             f"all-linear, seeds {list(p['seeds'])}. Exact match before training: {result['before']:.3f}.", "",
             "| method | variant | exact match (mean ± sd) | Δ vs LoRA (same seeds) | trainable params (× LoRA) | s/step | peak MB | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    n_seeds = len(p["seeds"])
    for r in result["table"]:
        vs = f"{r['vs_lora']:+.3f}" if "vs_lora" in r else ""
        fewer = f" ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''}: {sorted(r['seed_list'])})" \
            if r["seeds"] < n_seeds else ""
        pv = f"{r['trainable_params']:,} ({r['params_vs_lora']:.2f}×)" if "params_vs_lora" in r else f"{r['trainable_params']:,}"
        lines.append(f"| {r['method']} | {r['variant']} | {r['after_mean']:.3f} ± {r['after_std']:.3f}{fewer} | {vs} | {pv} | "
                     f"{r['s_per_step']:.3f} | {r['peak_memory_mb']:.0f} | {r['final_loss']:.3f} |")
    for method, variant, why in result.get("skipped", []):
        lines.append(f"| {method} | {variant} | skipped: {why} | | | | | |")
    picks = [f"seed {r['seed']}: {r['selected_layers']}" for r in result["runs"] if "selected_layers" in r]
    if picks:
        lines += ["", f"Layers Flexora selected (stage 2 trained LoRA on these only): {'; '.join(picks)}."]
    if result.get("combined_from"):
        lines += ["", "Combined from (a later file's run of a method and seed replaces an earlier one's; s/step is "
                  "each source run's and comparable only within one):", ""]
        for c in result["combined_from"]:  # a command that quotes commands itself is shown as it is
            command = c["command"] if "`" in str(c["command"]) else f"`{c['command']}`"
            lines.append(f"- `{c['file']}`: {command} — rows {', '.join(c['rows'])}")
        if result.get("reruns"):
            same = all(r["before"] == r["after"] for r in result["reruns"])
            lines += ["", "Re-run in a later file (exact match earlier → later)" + (": all reproduced exactly." if same
                      else "; a changed score means the method changed or the run is not deterministic:"), ""]
            lines += [f"- {r['method']} seed {r['seed']}: {r['before']:.3f} → {r['after']:.3f}" for r in result["reruns"]]
    import lorakit as lk
    own = ", ".join(m.name for m in lk.list_methods() if m.bench_variants is not None)
    lines += ["", "Every method trains from its registered default variant here" + (
              f" ({own}: the benchmark variant it registers for full-size models, `bench_variants`)" if own else "") +
              "; fresh experts for the mixtures of existing adapters. Equal-budget comparisons of the mixtures, and "
              "MeteoRA / X-LoRA / MixDA composing real per-task adapters, are in `lorakit bench mixtures` (benchmarks/mixtures.md)."]
    return "\n".join(lines) + "\n"


def plot_methods(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    labels = [f"{r['method']}\n{r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    ax.bar(labels, [r["after_mean"] for r in rows], yerr=[r["after_std"] for r in rows], capsize=3, color="#4c72b0")
    ax.axhline(result["before"], color="grey", linestyle="--", label="base model (before)")
    ax.set_ylabel("exact match")
    ax.set_title("Methods on the bundled model")
    ax.legend(loc="lower right")
    fig.tight_layout()
    bar = out_dir / "methods_exact_match.png"
    save_figure(fig, bar, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.errorbar(r["trainable_params"], r["after_mean"], yerr=r["after_std"], fmt="o", capsize=3)
        ax.annotate(f"{r['method']}/{r['variant']}", (r["trainable_params"], r["after_mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("exact match")
    fig.tight_layout()
    scatter = out_dir / "methods_params.png"
    save_figure(fig, scatter, dpi=110)
    plt.close(fig)
    return [bar, scatter]


@dataclass
class TasksProfile:
    """Plain LoRA on each built-in task alone: the bundled model's before/after table in the README."""

    tasks: tuple[str, ...] = ()  # empty: every built-in task
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 16
    train_examples: int = 2000
    eval_examples: int = 100
    seed: int = 0


def run_tasks(profile: TasksProfile, progress: bool = False) -> dict:
    import lorakit as lk
    from ..data import TASKS, evaluate_examples, load_examples
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train

    base, tokenizer = load_model_and_tokenizer(None)
    rows = []
    for task in profile.tasks or tuple(TASKS):
        model = copy.deepcopy(base)
        torch.manual_seed(profile.seed)
        test = load_examples(task, "test", n=profile.eval_examples, seed=profile.seed)
        before = evaluate_examples(model, tokenizer, test)["exact_match"]
        lk.add_adapter(model, lk.LoraConfig(r=profile.r, lora_alpha=2 * profile.r, target_modules="all-linear"))
        config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr, warmup_ratio=0.05,
                             lr_schedule="cosine", seed=profile.seed, max_length=128)
        t0 = time.perf_counter()
        result = train(model, tokenizer, load_examples(task, "train", n=profile.train_examples, seed=profile.seed),
                       config, progress=progress)
        rows.append({"task": task, "before": before, "after": evaluate_examples(model, tokenizer, test)["exact_match"],
                     "first_loss": result.losses[0], "final_loss": result.losses[-1],
                     "seconds": time.perf_counter() - t0})
    return {"profile": asdict(profile), "rows": rows}


def tasks_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"LoRA r={p['r']} (α={2 * p['r']}) on all linear layers, {p['steps']} steps × batch {p['batch_size']}, "
             f"lr {p['lr']}, cosine, seed {p['seed']}; {p['eval_examples']} held-out test examples per task.", "",
             "| task | exact match before | after | loss first → last step | train time (s) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['before']:.2f} | {r['after']:.2f} | {r['first_loss']:.2f} → "
                     f"{r['final_loss']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
