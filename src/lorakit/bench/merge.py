"""``lorakit bench merge``: merging per-task adapters on the bundled model, and merge speed against PEFT.

**quality** — one LoRA (r=8, α=16, all-linear) trained per built-in task; each adapter alone, the oracle (each
task served by its own adapter, needs the task label), one multi-task LoRA trained on the mixed data, and every
merge method of :mod:`lorakit.compose` applied to the N adapters with the same weights 1/N (task arithmetic
also with weights 1, the plain sum; SCE and LoRA-LEGO with weights 1: they average by themselves — SCE divides by
its own weights, LEGO's centroids are means — so 1/N would shrink them N times more). Sparsifying methods use density 0.5 (DELLA ε = 0.15, breadcrumbs γ = 0.01,
SCE top 50 % by variance). Equal merged rank: ``svd``, ``ties_svd``, ``dare_linear_svd`` at rank 8 against
LoRA-LEGO with k = 8 centroids (dual, parameter-level and output-level reweighting); LoRA-LEGO with k = 32
(all units kept) shows the reweighting alone.

**collapse** — a MixLoRA (5 experts of rank 4, top-2, shared attention LoRA r=8) trained on the mixed data,
then collapsed into one plain LoRA (expert weights uniform, or the mean routing weights measured on training
prompts); the table gives the metric before and after (what collapsing costs).

**speed** — merging 100 random r=16 all-linear adapters on the 8-layer, 512-hidden Llama (``llama-8x512``)
with lorakit (``svd`` to rank 16, and ``cat``) against PEFT's ``add_weighted_adapter`` (same combination type)
on the same adapter tensors, interleaved repeats, as a ratio.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from . import save_figure
from ..io.files import atomic_write_bytes
from .mixtures import _score, _train_config

MERGES: dict[str, tuple[str, dict]] = {  # row -> (method, options); weights 1/N unless the row says otherwise
    "linear (mean)": ("linear", {}),
    "task arithmetic (sum, λ=1)": ("task_arithmetic", {"weights": 1.0}),
    "cat (mean; = linear, rank 32)": ("cat", {}),
    "magnitude_prune d=0.5": ("magnitude_prune", {"density": 0.5}),
    "ties d=0.5": ("ties", {"density": 0.5}),
    "dare_linear d=0.5": ("dare_linear", {"density": 0.5}),
    "dare_ties d=0.5": ("dare_ties", {"density": 0.5}),
    "della d=0.5": ("della", {"density": 0.5}),
    "della_linear d=0.5": ("della_linear", {"density": 0.5}),
    "breadcrumbs d=0.5": ("breadcrumbs", {"density": 0.5}),
    "breadcrumbs_ties d=0.5": ("breadcrumbs_ties", {"density": 0.5}),
    "sce top 0.5": ("sce", {"select_topk": 0.5, "weights": 1.0}),
    "svd rank 8": ("svd", {"svd_rank": 8}),
    "ties_svd d=0.5 rank 8": ("ties_svd", {"density": 0.5, "svd_rank": 8}),
    "dare_linear_svd d=0.5 rank 8": ("dare_linear_svd", {"density": 0.5, "svd_rank": 8}),
    "lego k=8 dual": ("lego", {"svd_rank": 8, "reweighting": "dual", "weights": 1.0}),
    "lego k=8 parameter-level": ("lego", {"svd_rank": 8, "reweighting": "parameter", "weights": 1.0}),
    "lego k=8 output-level": ("lego", {"svd_rank": 8, "reweighting": "output", "weights": 1.0}),
    "lego k=8 no reweighting": ("lego", {"svd_rank": 8, "reweighting": "none", "weights": 1.0}),
    "lego k=32 dual (no clustering)": ("lego", {"svd_rank": 32, "reweighting": "dual", "weights": 1.0}),
}


@dataclass
class MergeProfile:
    tasks: str = "reverse,rotate,sort,upper"
    task_steps: int = 60
    multitask_steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    train_examples: int = 1000
    eval_examples: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    merges: tuple[str, ...] = tuple(MERGES)
    experiments: tuple[str, ...] = ("quality", "collapse", "speed")
    speed_adapters: int = 100
    speed_repeats: int = 1
    speed_model: str = "llama-8x512"


QUICK = MergeProfile(task_steps=2, multitask_steps=2, batch_size=4, train_examples=8, eval_examples=2, seeds=(0,),
                     tasks="reverse,upper", merges=("linear (mean)", "ties d=0.5", "lego k=8 dual"),
                     speed_adapters=3, speed_repeats=1, speed_model="llama-tiny")
FULL = MergeProfile()


def _train_lora(base, tokenizer, examples, profile, steps, seed):
    import lorakit as lk
    from ..training import train

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    train(model, tokenizer, examples, replace(_train_config(profile, steps, seed)))
    return model


def run_quality(profile: MergeProfile, base, tokenizer, workdir: Path, seed: int) -> list[dict]:
    import lorakit as lk
    from ..compose import merge_adapters
    from ..data import load_examples

    tasks = profile.tasks.split(",")
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    runs, paths = [], []
    for task in tasks:
        model = _train_lora(base, tokenizer, load_examples(task, "train", n=profile.train_examples, seed=seed),
                            profile, profile.task_steps, seed)
        paths.append(lk.save_adapter(model, workdir / f"seed{seed}" / task))
        runs.append({"row": f"adapter '{task}' alone", "kind": "reference", "seed": seed,
                     **_score(model, tokenizer, eval_ex)})
    per_task = {t: r["per_task"][t] for t, r in zip(tasks, runs)}
    runs.append({"row": "oracle (own adapter per task)", "kind": "reference", "seed": seed, "per_task": per_task,
                 "exact_match": statistics.mean(per_task.values())})
    model = _train_lora(base, tokenizer, load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed),
                        profile, profile.multitask_steps, seed)
    runs.append({"row": f"multi-task LoRA r=8 ({profile.multitask_steps} steps)", "kind": "reference", "seed": seed,
                 **_score(model, tokenizer, eval_ex)})
    for row in profile.merges:
        method, opts = MERGES[row]
        opts = dict(opts)
        w = opts.pop("weights", 1.0 / len(tasks))
        merged = merge_adapters(paths, [w] * len(tasks), method, model=copy.deepcopy(base), seed=seed, **opts)
        model = copy.deepcopy(base)
        lk.load_adapter(model, merged.save(workdir / f"seed{seed}" / f"merged-{method}"))
        runs.append({"row": row, "kind": "merge", "method": method, "seed": seed, "merged_rank": merged.config.r,
                     **_score(model, tokenizer, eval_ex)})
    return runs


def run_collapse(profile: MergeProfile, base, tokenizer, seed: int) -> list[dict]:
    import lorakit as lk
    from ..compose import collapse_experts
    from ..data import load_examples
    from ..methods.mixlora import MixLoraConfig
    from ..training import train

    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    train_ex = load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lk.add_adapter(model, MixLoraConfig(r=8, lora_alpha=16, expert_r=4, expert_lora_alpha=8, num_experts=5, top_k=2))
    train(model, tokenizer, train_ex, _train_config(profile, profile.multitask_steps, seed))
    runs = [{"row": "mixlora 5×r4 top-2 (trained)", "kind": "collapse", "seed": seed, **_score(model, tokenizer, eval_ex)}]
    calibration = [torch.tensor([tokenizer.encode(ex.prompt + ex.completion)]) for ex in train_ex[:64]]
    for label, kw in (("collapsed, uniform expert weights (linear)", {"expert_weights": "uniform"}),
                      ("collapsed, routing-measured weights (linear)", {"expert_weights": "routing",
                                                                         "calibration": calibration})):
        merged = collapse_experts(model, "default", "linear", **kw)
        with tempfile.TemporaryDirectory() as tmp:
            plain = copy.deepcopy(base)
            lk.load_adapter(plain, merged.save(tmp))
        runs.append({"row": label, "kind": "collapse", "seed": seed, "merged_rank": merged.config.r,
                     **_score(plain, tokenizer, eval_ex)})
    return runs


def run_speed(profile: MergeProfile) -> list[dict]:
    """lorakit vs PEFT add_weighted_adapter, same 100 adapters (tensors copied from PEFT into lorakit)."""
    import peft

    import lorakit as lk
    from ..compose import merge_adapters
    from ..core.model import adapter_parameters
    from ..io.peft_format import PREFIX
    from .perf import build_model
    from .timing import ratio, time_interleaved

    n, r = profile.speed_adapters, 16
    base = build_model(profile.speed_model, "cpu")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    names = [f"a{i}" for i in range(n)]
    for name in names[1:]:
        theirs.add_adapter(name, cfg)
    ours = copy.deepcopy(base)
    for name in names:
        lk.add_adapter(ours, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), name)
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        plan = {k.removeprefix(PREFIX): v for k, v in state.items()}
        with torch.no_grad():
            for key, p in adapter_parameters(ours, name).items():
                host = key.replace(f".adapters.{name}.", ".").replace(".base_layer", "")
                p.copy_(plan[host])
    weights = [1.0 / n] * n
    rows = []
    for combination, kw in (("svd", {"svd_rank": r}), ("cat", {})):
        def peft_merge(c=combination):
            theirs.add_weighted_adapter(names, weights, "merged", combination_type=c, svd_rank=r if c == "svd" else None)
            theirs.delete_adapter("merged")

        def lorakit_merge(c=combination, kw=kw):
            merge_adapters(names, weights, c, model=ours, **kw)

        times = time_interleaved({"peft": peft_merge, "lorakit": lorakit_merge}, repeats=profile.speed_repeats,
                                 warmup=0)
        rows.append({"combination": combination, "adapters": n, "r": r, "model": profile.speed_model, **times,
                     "peft_over_lorakit": ratio(times["peft"], times["lorakit"])})
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["row"], []).append(r)
    out = []
    for label, rs in groups.items():
        scores = [r["exact_match"] for r in rs]
        tasks = sorted(rs[0]["per_task"])
        row = {"row": label, "kind": rs[0]["kind"], "seeds": len(rs), "mean": statistics.mean(scores),
               "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "per_task": {t: statistics.mean(r["per_task"][t] for r in rs) for t in tasks}}
        if "merged_rank" in rs[0]:
            row["merged_rank"] = rs[0]["merged_rank"]
        out.append(row)
    return out


def run_merge(profile: MergeProfile, partial: Path | None = None, workdir: str | None = None) -> dict:
    """Every experiment of the profile: the first seed's quality and collapse runs, then the speed rows, then the
    other seeds; with ``partial``, the result so far is written there after each stage (a loaded machine may not
    finish every seed: ``seeds_done`` says which are in)."""
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer

    result: dict = {"profile": asdict(profile), "seeds_done": []}

    def save():
        if partial is not None:
            atomic_write_bytes(partial, json.dumps(result, indent=1, default=str).encode())

    base, tokenizer = load_model_and_tokenizer(None)
    result["before"] = _score(base, tokenizer, load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234))
    quality, collapse = [], []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, seed in enumerate(profile.seeds):
            if "quality" in profile.experiments:
                quality += run_quality(profile, base, tokenizer, Path(tmp), seed)
                result["quality"] = {"runs": quality, "table": summarise(quality)}
            if "collapse" in profile.experiments:
                collapse += run_collapse(profile, base, tokenizer, seed)
                result["collapse"] = {"runs": collapse, "table": summarise(collapse)}
            result["seeds_done"].append(seed)
            save()
            if i == 0 and "speed" in profile.experiments:
                result["speed"] = run_speed(profile)
                save()
    if "speed" in profile.experiments and "speed" not in result:
        result["speed"] = run_speed(profile)
    return result


# The profile fields that must agree for runs to be pooled (seeds, experiments and the speed repeats may differ).
_POOLED_PROFILE = ("tasks", "task_steps", "multitask_steps", "batch_size", "lr", "train_examples", "eval_examples",
                   "merges")
_RESULT_KEYS = {"profile", "seeds_done", "before", "quality", "collapse", "speed", "command", "machine", "plots",
                "wall_time_s", "combined_from"}


def combine_results(results: list[dict], names: Sequence[str] | None = None) -> dict:
    """One result from saved runs of the same profile — e.g. one run per seed (``--seeds 2``) and a speed-only run
    (``--experiments speed``): quality and collapse runs pooled by seed (a later file's seed replaces an earlier
    one's) and re-summarised, speed rows from the last file that has them. Keys a file carries beyond the bench's
    own (notes such as ``reran_with_weights_1``) are kept from the first file that has them. Raises ConfigError
    when the files' profiles differ in what makes runs comparable (tasks, steps, examples, merges)."""
    from ..core.errors import ConfigError

    if not results:
        raise ConfigError("combine needs at least one result file")
    for i, r in enumerate(results):
        where = names[i] if names else (r.get("command") or f"result {i + 1}")
        if not isinstance(r.get("profile"), dict) or not any(k in r for k in ("quality", "collapse", "speed")):
            raise ConfigError(f"{where}: not a `bench merge` result (no profile, or none of quality / collapse / "
                              f"speed)")
        missing = [k for k in _POOLED_PROFILE if k not in r["profile"]]
        if missing and ("quality" in r or "collapse" in r):
            raise ConfigError(f"{where}: its profile lacks {missing}")
        for part in ("quality", "collapse"):
            if any("seed" not in run for run in r.get(part, {}).get("runs", [])):
                raise ConfigError(f"{where}: a {part} run has no 'seed'")
    first = results[0]["profile"]
    for r in results[1:]:
        differ = [k for k in _POOLED_PROFILE if k in r["profile"] and r["profile"][k] != first[k]]
        if differ and ("quality" in r or "collapse" in r):
            raise ConfigError(f"cannot pool runs whose profiles differ in {differ}: the seeds would not be comparable")
    out: dict = {"profile": dict(first), "seeds_done": [], "combined_from": []}
    for part in ("quality", "collapse"):
        runs: dict[int, list[dict]] = {}
        for r in results:
            for seed in {run["seed"] for run in r.get(part, {}).get("runs", [])}:
                runs[seed] = [run for run in r[part]["runs"] if run["seed"] == seed]
        if runs:
            pooled = [run for seed in sorted(runs) for run in runs[seed]]
            out[part] = {"runs": pooled, "table": summarise(pooled)}
            out["seeds_done"] = sorted(set(out["seeds_done"]) | set(runs))
    out["profile"]["seeds"] = out["seeds_done"]
    for r in results:
        out["combined_from"].append({"command": r.get("command"), "seeds": r.get("seeds_done"),
                                     "parts": [k for k in ("quality", "collapse", "speed") if k in r]})
        if "speed" in r:
            out["speed"] = r["speed"]
            out["profile"].update({k: r["profile"][k] for k in ("speed_adapters", "speed_repeats", "speed_model")})
        for k in ("before", "machine"):
            if k in r:
                out.setdefault(k, r[k])
        for k, v in r.items():
            if k not in _RESULT_KEYS:
                out.setdefault(k, v)
    return out


def report(result: dict, out: Path, command: str) -> None:
    """Write merge.json / merge.md / merge.png from a (possibly partial) result."""
    from .cli import _write
    from .perf import machine_description

    result.setdefault("machine", machine_description("cpu"))
    result["plots"] = [str(p) for p in plot_merge(result, out)]
    _write(out, "merge", result, merge_markdown(result), command)


def merge_markdown(result: dict) -> str:
    p = result["profile"]
    tasks = p["tasks"].split(",")
    seeds = list(result.get("seeds_done") or p["seeds"])
    lines = []
    if "quality" in result or "collapse" in result:
        lines += [f"Tasks `{p['tasks']}` ({p['train_examples']} training and {p['eval_examples']} test examples each), "
                  f"LoRA r=8 α=16 all-linear, {p['task_steps']} steps per task adapter, batch {p['batch_size']}, lr "
                  f"{p['lr']}; seeds {seeds}; exact match on the held-out test set (mean ± sd over seeds). Base model "
                  f"before training: {result['before']['exact_match']:.3f}. Merge weights 1/N unless stated.", ""]

    def table(rows):
        cols = ["configuration", "merged rank", "exact match", *tasks]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [str(r.get("merged_rank", "")), f"{r['mean']:.3f} ± {r['sd']:.3f}"]
            cells += [f"{r['per_task'].get(t, float('nan')):.2f}" for t in tasks]
            out.append(f"| {r['row']} | " + " | ".join(cells) + " |")
        return out

    if "quality" in result:
        lines += ["## Merging per-task adapters", ""] + table(result["quality"]["table"]) + [""]
    if "collapse" in result:
        lines += ["## Collapsing a trained MixLoRA into one LoRA", ""] + table(result["collapse"]["table"]) + [""]
    if "speed" in result:
        lines += [f"## Merge time: {p['speed_adapters']} adapters r=16 all-linear, {p['speed_model']}, CPU", "",
                  "| combination | PEFT add_weighted_adapter (s, min) | lorakit merge_adapters (s, min) | PEFT / lorakit (min) | (median) |",
                  "|---|---|---|---|---|"]
        for r in result["speed"]:
            lines.append(f"| {r['combination']} | {r['peft']['min_s']:.2f} | {r['lorakit']['min_s']:.2f} | "
                         f"{r['peft_over_lorakit']['min']:.2f}× | {r['peft_over_lorakit']['median']:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def plot_merge(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "quality" not in result:
        return []
    rows = result["quality"]["table"]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    colors = {"reference": "tab:gray", "merge": "tab:blue"}
    labels = [r["row"] for r in rows]
    ax.barh(range(len(rows)), [r["mean"] for r in rows], xerr=[r["sd"] for r in rows],
            color=[("tab:orange" if r["row"].startswith("lego") else colors[r["kind"]]) for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("exact match (mean over tasks and seeds)")
    ax.set_title("lorakit bench merge: per-task adapters merged (gray: references, orange: LoRA-LEGO)")
    fig.tight_layout()
    path = out / "merge.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
