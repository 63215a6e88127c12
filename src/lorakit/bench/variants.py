"""``lorakit bench variants``: the rank-adapting LoRA re-parameterisations (issue 17) on the bundled model.

One run gives, on the same tasks, data, steps and seeds:

- a row per method (FFA-LoRA, LoRA-XS, SLoRA, NLoRA, IntTune, DyLoRA, SoRA) next to LoRA at the same r, with
  trainable parameters and training step time as a ratio to LoRA's (medians, measured in this run);
- DyLoRA trained once at r_max and evaluated at every rank 1..r_max, next to LoRAs trained separately at
  each of those ranks (also the "LoRA r=1" reference for LoRA-XS and IntTune);
- SoRA's final live ranks per module (the rank_pattern of its pruned export) and LoRA at the nearest
  equal parameter count.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import save_figure

# SoRA runs its sparsifying-schedule variant: at the default ξ = 1e-3, 100 steps shrink N(0, 1) gates by only
# ~0.1, so almost no rank would be pruned in a run this short.
BENCH_VARIANT = {"sora": "sora_schedule", "increlora": "increlora_short"}
METHODS = ("lora", "ffa_lora", "lora_xs", "slora", "nlora", "inttune", "dylora", "sora", "increlora")


@dataclass
class VariantsProfile:
    tasks: str = "reverse,rotate,sort,upper"
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 8
    train_examples: int = 1000
    eval_examples: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS


QUICK = VariantsProfile(steps=3, batch_size=4, train_examples=20, eval_examples=4, seeds=(0,), tasks="reverse,add",
                        r=2)
FULL = VariantsProfile()


def run_variants(profile: VariantsProfile, progress: bool = False, previous: Sequence[dict] = ()) -> dict:
    """Train and score every method on every seed of ``profile``. ``previous``: results of earlier runs of the same
    profile (``variants.json``, any seeds); their seeds in ``profile.seeds`` are read back instead of rerun, so a
    long run can go seed by seed, each in its own process, and be combined (mean ± sd over all seeds). Raises
    ConfigError when a previous result ran other options (see ``_previous_seeds``)."""
    from dataclasses import replace

    done = _previous_seeds(profile, previous)
    todo = tuple(s for s in profile.seeds if s not in done)
    parts = [_seed_part(rec, seed) for seed, rec in done.items()]
    if todo:
        parts.append(_run_seeds(replace(profile, seeds=todo), progress))
    result = {"profile": asdict(profile), "before": parts[0]["before"], "resumed_seeds": sorted(done)}
    order = {s: i for i, s in enumerate(profile.seeds)}
    methods = list(profile.methods)
    for key in _RECORD_KEYS:
        records = [r for part in parts for r in part[key]]
        if key == "runs":  # the table's method order, then seeds
            records.sort(key=lambda r: (methods.index(r["method"]), order[r["seed"]]))
        else:  # stable: each seed keeps its own order (ranks, steps)
            records.sort(key=lambda r: order[r["seed"]])
        result[key] = records
    result["table"] = summarise(result["runs"])
    return result


_RECORD_KEYS = ("runs", "dylora_ranks", "lora_ranks", "sora_ranks", "increlora_history")


def _seed_part(result: dict, seed: int) -> dict:
    return {"before": result["before"], **{k: [r for r in result.get(k, []) if r["seed"] == seed] for k in _RECORD_KEYS}}


def _previous_seeds(profile: VariantsProfile, previous: Sequence[dict]) -> dict[int, dict]:
    """seed -> the earlier result holding it, for the seeds of ``profile`` found in ``previous`` (the first result
    naming a seed wins). Raises ConfigError when an earlier result ran another profile (any field but the seeds),
    or scored the base model differently before training (another eval set or base)."""
    from ..core.errors import ConfigError

    want = {k: v for k, v in asdict(profile).items() if k != "seeds"}
    done: dict[int, dict] = {}
    befores: list[float] = []
    for i, res in enumerate(previous):
        if not isinstance(res.get("before"), (int, float)) or not isinstance(res.get("runs"), list):
            raise ConfigError(f"bench variants --resume: previous result {i} is not a `bench variants` result (no "
                              f"'before' score or 'runs'){' — it was made by: ' + res['command'] if res.get('command') else ''}")
        have = {k: tuple(v) if isinstance(v, list) else v for k, v in res.get("profile", {}).items() if k != "seeds"}
        differ = sorted(k for k in want if have.get(k) != want[k])
        if differ:
            raise ConfigError("bench variants --resume: previous result {} ran other options ({}); resume with the "
                              "same options, only --seeds may differ".format(
                                  i, ", ".join(f"{k}={have.get(k)!r}, here {want[k]!r}" for k in differ)))
        if befores and abs(befores[0] - res["before"]) > 1e-9:
            raise ConfigError(f"bench variants --resume: previous result {i} scored the base model {res['before']} "
                              f"before training, an earlier one {befores[0]}: not the same base or eval set")
        befores.append(res["before"])
        for seed in res["profile"]["seeds"]:
            if seed in profile.seeds and seed not in done:
                if not any(r.get("seed") == seed for r in res.get("runs", [])):
                    raise ConfigError(f"bench variants --resume: previous result {i} lists seed {seed} but holds no "
                                      f"run of it; drop the seed from that file's profile or rerun it")
                done[seed] = res
    return done


def _run_seeds(profile: VariantsProfile, progress: bool = False) -> dict:
    import lorakit as lk
    from ..data import evaluate_examples, load_examples
    from ..hub import load_model_and_tokenizer
    from ..methods.dylora import set_rank
    from ..methods.increlora import rank_pattern as increlora_ranks
    from ..methods.sora import rank_distribution
    from ..training import TrainConfig, train
    from .methods import _config_for

    base, tokenizer = load_model_and_tokenizer(None)
    train_ex = {s: load_examples(profile.tasks, "train", n=profile.train_examples, seed=s) for s in profile.seeds}
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    before = evaluate_examples(base, tokenizer, eval_ex)["exact_match"]

    def run(config, seed, on_log=()):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        lk.add_adapter(model, config)
        trainable, _ = lk.trainable_parameters(model)
        tc = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                         warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine", seed=seed,
                         max_length=128, log_every=1)
        t0 = time.perf_counter()
        result = train(model, tokenizer, train_ex[seed], tc, progress=progress,
                       on_log=[lambda rec: cb(model, rec) for cb in on_log])
        return model, {"seed": seed, "trainable_params": trainable, "final_loss": result.losses[-1],
                       "s_per_step": (time.perf_counter() - t0) / profile.steps}

    def score(model):
        return evaluate_examples(model, tokenizer, eval_ex)["exact_match"]

    runs, dylora_ranks, lora_ranks, sora_ranks, incre_history = [], [], [], [], []

    def record_increlora_ranks(model, rec):
        if "loss" in rec:
            incre_history.append({"seed": rec_seed[0], "step": rec["step"], "ranks": increlora_ranks(model, "default"),
                                  "live_params": live_params(model)})

    rec_seed = [0]
    for name in profile.methods:
        method = lk.get_method(name)
        variant = BENCH_VARIANT.get(name, next(iter(method.benchmark_variants())))
        for seed in profile.seeds:
            rec_seed[0] = seed
            hooks = [record_increlora_ranks] if name == "increlora" else []
            model, rec = run(_config_for(method, variant, profile.r), seed, on_log=hooks)
            rec.update(method=name, variant=variant, after=score(model))
            runs.append(rec)
            if name == "dylora":  # the same trained adapter at every rank
                for b in range(1, profile.r + 1):
                    set_rank(model, "default", b)
                    dylora_ranks.append({"seed": seed, "rank": b, "after": score(model)})
            if name == "sora":
                ranks = rank_distribution(model, "default")
                sora_ranks.append({"seed": seed, "ranks": ranks, "live_params": live_params(model)})
    for b in range(1, profile.r + 1):  # separately trained LoRAs (r = r_max is the LoRA row above)
        for seed in profile.seeds:
            if b == profile.r and "lora" in profile.methods:
                after = next(r["after"] for r in runs if r["method"] == "lora" and r["seed"] == seed)
                params = next(r["trainable_params"] for r in runs if r["method"] == "lora" and r["seed"] == seed)
            else:
                model, rec = run(lk.LoraConfig(r=b, lora_alpha=2 * b, target_modules="all-linear"), seed)
                after, params = score(model), rec["trainable_params"]
            lora_ranks.append({"seed": seed, "rank": b, "after": after, "trainable_params": params})
    return {"profile": asdict(profile), "before": before, "runs": runs, "table": summarise(runs),
            "dylora_ranks": dylora_ranks, "lora_ranks": lora_ranks, "sora_ranks": sora_ranks,
            "increlora_history": incre_history}


def live_params(model) -> int:
    """Parameters of the plain LoRA a SoRA / IncreLoRA adapter exports to: Σ over modules of live ranks · (in + out)."""
    from ..core.model import adapter_layers

    total = 0
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        total += int(d.live_ranks().numel()) * (d.info.in_features + d.info.out_features)
    return total


def _mean_sd(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    ref = by.get("lora")
    ref_step = statistics.median(r["s_per_step"] for r in ref) if ref else None
    ref_mean = statistics.mean(r["after"] for r in ref) if ref else None
    rows = []
    for name, rs in by.items():
        mean, sd = _mean_sd(r["after"] for r in rs)
        step = statistics.median(r["s_per_step"] for r in rs)
        row = {"method": name, "variant": rs[0]["variant"], "seeds": len(rs), "after_mean": mean, "after_std": sd,
               "trainable_params": rs[0]["trainable_params"], "s_per_step": step,
               "final_loss": statistics.mean(r["final_loss"] for r in rs)}
        if ref:
            row.update(vs_lora=mean - ref_mean, step_vs_lora=step / ref_step,
                       params_vs_lora=row["trainable_params"] / ref[0]["trainable_params"])
        rows.append(row)
    return rows


def _per_rank(records, key="after"):
    ranks = sorted({r["rank"] for r in records})
    return ranks, [_mean_sd(r[key] for r in records if r["rank"] == b) for b in ranks]


def variants_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Tasks `{p['tasks']}`, {p['steps']} steps × batch {p['batch_size']}, lr {p['lr']}, r={p['r']} "
             f"(α = 2r unless the method's default variant sets it) all-linear, seeds {list(p['seeds'])}. "
             f"Exact match before training: {result['before']:.3f}.", "",
             "| method | exact match (mean ± sd) | Δ vs LoRA | trainable params (× LoRA) | s/step | step time × LoRA | final loss |",
             "|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['method']} | {r['after_mean']:.3f} ± {r['after_std']:.3f} | {r.get('vs_lora', 0):+.3f} | "
                     f"{r['trainable_params']:,} ({r.get('params_vs_lora', 1):.3f}×) | {r['s_per_step']:.3f} | "
                     f"{r.get('step_vs_lora', 1):.2f}× | {r['final_loss']:.3f} |")
    if result["dylora_ranks"]:
        ranks, dy = _per_rank(result["dylora_ranks"])
        _, lo = _per_rank(result["lora_ranks"])
        lines += ["", "DyLoRA (one run at r_max, evaluated at rank b) vs LoRA trained separately at rank b:", "",
                  "| rank b | DyLoRA @ b | LoRA r=b |", "|---|---|---|"]
        for b, (dm, ds), (lm, ls) in zip(ranks, dy, lo):
            lines.append(f"| {b} | {dm:.3f} ± {ds:.3f} | {lm:.3f} ± {ls:.3f} |")
    for rec in result["sora_ranks"]:
        ranks = rec["ranks"]
        lines += ["", f"SoRA seed {rec['seed']}: live ranks per module (of {p['r']}): total "
                  f"{sum(ranks.values())} / {p['r'] * len(ranks)}, pruned plain-LoRA parameters {rec['live_params']:,}; "
                  f"histogram {dict(sorted(_hist(ranks.values()).items()))}"]
    finals = {h["seed"]: h for h in result.get("increlora_history") or []}  # each seed's last record
    for last in finals.values():
        ranks = last["ranks"]
        lines += ["", f"IncreLoRA seed {last['seed']}: final ranks per module at step {last['step']}: total "
                  f"{sum(ranks.values())} (budget: target_rank × {len(ranks)} modules), exported plain-LoRA parameters "
                  f"{last['live_params']:,}, "
                  f"histogram {dict(sorted(_hist(ranks.values()).items()))}"]
    return "\n".join(lines) + "\n"


def _hist(values) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def plot_variants(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if result["dylora_ranks"]:
        ranks, dy = _per_rank(result["dylora_ranks"])
        _, lo = _per_rank(result["lora_ranks"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar(ranks, [m for m, _ in dy], yerr=[s for _, s in dy], marker="o", capsize=3,
                    label="DyLoRA (one run, r_max) at rank b")
        ax.errorbar(ranks, [m for m, _ in lo], yerr=[s for _, s in lo], marker="s", capsize=3,
                    label="LoRA trained at r = b")
        ax.axhline(result["before"], color="grey", linestyle="--", label="base model")
        ax.set_xlabel("rank b")
        ax.set_ylabel("exact match")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "variants_dylora_ranks.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    if result["sora_ranks"]:
        fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(result["sora_ranks"][0]["ranks"])), 3.5))
        for rec in result["sora_ranks"]:
            names = list(rec["ranks"])
            ax.plot(range(len(names)), list(rec["ranks"].values()), marker="o", label=f"seed {rec['seed']}")
        ax.set_xticks(range(len(names)), [n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                                          for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("live ranks after training")
        ax.set_title("SoRA: ranks kept per module")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "variants_sora_ranks.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    history = result.get("increlora_history") or []
    if history:
        seed = history[0]["seed"]
        steps = [h["step"] for h in history if h["seed"] == seed]
        modules = list(history[0]["ranks"])
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for m in modules:
            ax.plot(steps, [h["ranks"][m] for h in history if h["seed"] == seed], linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("rank")
        ax.set_title(f"IncreLoRA: rank per module over training ({len(modules)} modules, seed {seed})")
        fig.tight_layout()
        paths.append(out_dir / "variants_increlora_ranks.png")
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def run_step_times(profile: VariantsProfile, rounds: int = 6, steps_per_round: int = 3) -> dict:
    """Training step time of each method as a ratio to LoRA's (see ``interleaved_step_times``)."""
    import lorakit as lk
    from .methods import _config_for

    configs = {name: _config_for(lk.get_method(name), BENCH_VARIANT.get(name, next(iter(lk.get_method(name).benchmark_variants()))),
                                 profile.r) for name in profile.methods}
    load_before = _load_average()
    rows = interleaved_step_times(configs, profile.tasks, profile.batch_size, profile.lr, profile.steps, rounds,
                                  steps_per_round)
    return {"profile": asdict(profile), "rounds": rounds, "steps_per_round": steps_per_round, "rows": rows,
            "load_average": [load_before, _load_average()] if load_before else None}


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS keeps none (Windows)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def interleaved_step_times(configs: dict, tasks: str, batch_size: int, lr: float, total_steps: int, rounds: int = 6,
                           steps_per_round: int = 3) -> list[dict]:
    """Every round times ``steps_per_round`` optimizer steps (forward, backward, AdamW, the method's hooks) of every
    contender (name -> adapter config, on the bundled model) in turn on the same batch, so machine load drifting
    during the run hits all alike. Rows: median s/step and, with a ``"lora"`` contender, ratio = median over rounds
    of (contender's time / LoRA's time in that round); the same for the process's CPU time (``cpu_*``), which on a
    machine shared by more runnable processes than cores leaves out the time spent waiting for a core."""
    import lorakit as lk
    from ..core.model import adapter_state
    from ..data import CausalLMCollator, TokenizedDataset, load_examples
    from ..hub import load_model_and_tokenizer
    from ..training.config import TrainConfig
    from ..training.loop import make_optimizer

    base, tokenizer = load_model_and_tokenizer(None)
    examples = load_examples(tasks, "train", n=batch_size, seed=0)
    dataset = TokenizedDataset(examples, tokenizer, max_length=128)
    batch = CausalLMCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))][:batch_size])
    setups = {}
    for name, config in configs.items():
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        lk.add_adapter(model, config)
        model.train()
        optimizer, _ = make_optimizer(model, "default", TrainConfig(lr=lr))
        setups[name] = (model, optimizer, lk.get_method(adapter_state(model).configs["default"]))

    def steps(name: str, first: int) -> tuple[float, float]:
        model, optimizer, method = setups[name]
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(first, first + steps_per_round):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            if method.extra_loss is not None:
                loss = loss + method.extra_loss(model, "default")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if method.on_step is not None:
                method.on_step(model, "default", step, total_steps)
                lk.refresh_trainable(model)
        return (time.perf_counter() - t0) / steps_per_round, (time.process_time() - c0) / steps_per_round

    for name in setups:  # warm-up round, not timed
        steps(name, 1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for k in range(rounds):
        for name in setups:
            times[name].append(steps(name, 1 + (k + 1) * steps_per_round))
    ref = times.get("lora")
    rows = []
    for name, ts in times.items():
        row = {"method": name, "s_per_step_median": statistics.median(w for w, _ in ts),
               "cpu_s_per_step_median": statistics.median(c for _, c in ts)}
        if ref:
            row["ratio_vs_lora"] = statistics.median(t[0] / r[0] for t, r in zip(ts, ref))
            row["cpu_ratio_vs_lora"] = statistics.median(t[1] / r[1] for t, r in zip(ts, ref))
            row["round_ratios"] = [round(t[0] / r[0], 4) for t, r in zip(ts, ref)]
        rows.append(row)
    return rows


def step_times_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Training step time vs LoRA, interleaved ({result['rounds']} rounds × {result['steps_per_round']} steps per "
             f"method, batch {p['batch_size']}, r={p['r']} all-linear, tasks `{p['tasks']}`; ratio = median over rounds "
             "of method time / LoRA time in the same round; CPU: the same with the process's CPU time, which leaves "
             "out waiting for a core on a loaded machine).", "",
             "| method | s/step (median) | step time × LoRA | CPU s/step (median) | CPU time × LoRA |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        cpu = (f"{r['cpu_s_per_step_median']:.3f} | {r.get('cpu_ratio_vs_lora', 1):.2f}×"
               if "cpu_s_per_step_median" in r else "– | –")  # rows recorded before CPU time was kept
        lines.append(f"| {r['method']} | {r['s_per_step_median']:.3f} | {r.get('ratio_vs_lora', 1):.2f}× | {cpu} |")
    if result.get("load_average"):
        before, after = result["load_average"]
        lines += ["", f"Machine load (1/5/15-min load average, {os.cpu_count()} cores) before the run: "
                  f"{' / '.join(f'{x:.1f}' for x in before)}; after: {' / '.join(f'{x:.1f}' for x in after)}."]
    return "\n".join(lines) + "\n"
