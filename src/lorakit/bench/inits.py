"""``lorakit bench init``: each registered init against the default init at equal rank, on the bundled model
(loss and exact match over the first K steps, per seed), and the cost of running an init side by side with PEFT
(wall time and peak memory of LoRA-GA, EVA and PiSSA on a random 8-layer, 512-hidden Llama).

Cost is measured in one child process per (init, library, repeat), the repeats interleaved so machine noise hits
both libraries alike: wall time of "attach the adapter + run the init" and the peak resident memory above the
memory just before (sampled every millisecond from /proc/self/statm; on CUDA, the allocator's peak).
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# contender -> (method, method kwargs, init or None, the baseline it is compared with at equal rank)
CONTENDERS: dict[str, tuple[str, dict, str | None, str]] = {
    "lora": ("lora", {}, None, "lora"),
    "lora_ga": ("lora", {}, "lora_ga", "lora"),
    "lora_ga_official": ("lora", {}, "lora_ga_official", "lora"),
    "eva": ("lora", {}, "eva", "lora"),
    "pissa": ("lora", {}, "pissa", "lora"),
    "pissa_niter_4": ("lora", {}, "pissa_niter_4", "lora"),
    "olora": ("lora", {}, "olora", "lora"),
    "corda": ("lora", {}, "corda", "lora"),
    "lora_xs": ("lora_xs", {}, None, "lora_xs"),
    "lora_sb": ("lora_xs", {}, "lora_sb", "lora_xs"),
    "slora": ("slora", {}, None, "slora"),
    "slora+nlora": ("slora", {}, "nlora", "slora"),
}


@dataclass
class InitProfile:
    tasks: str = "reverse,upper,add,lookup"
    steps: int = 30
    eval_every: int = 15
    batch_size: int = 8
    lr: float = 2e-3
    r: int = 8
    init_batches: int = 16  # × batch_size = 128 samples, LoRA-GA's example
    train_examples: int = 1000
    eval_examples: int = 8  # per task
    seeds: tuple[int, ...] = (0, 1)  # reduced to fit a shared 2-core machine; 3 seeds: --seeds 0 1 2
    contenders: tuple[str, ...] = ("lora", "lora_ga", "eva", "lora_xs", "lora_sb", "pissa", "corda")
    cost_repeats: int = 2
    cost_inits: tuple[str, ...] = ("lora_ga", "eva", "pissa")
    cost_layers: int = 8
    cost_hidden: int = 512


QUICK = InitProfile(steps=4, eval_every=2, batch_size=4, init_batches=2, train_examples=16, eval_examples=2,
                    seeds=(0,), tasks="reverse", contenders=("lora", "lora_ga"), cost_repeats=1,
                    cost_inits=("pissa",), cost_layers=1, cost_hidden=64)
FULL = InitProfile()


def _config(method_name: str, kwargs: dict, r: int):
    import lorakit as lk

    method = lk.get_method(method_name)
    fields = method.config_cls.__dataclass_fields__
    kw = {"target_modules": "all-linear", **kwargs}
    if "r" in fields:
        kw["r"] = r
    if "lora_alpha" in fields:
        kw["lora_alpha"] = 2 * r
    return method.config_cls(**kw)


def run_convergence(profile: InitProfile, progress: bool = False, after_each=None) -> dict:
    """Every contender on every seed (seed-major, so an interrupted run has whole seeds); ``after_each(result)``
    gets the results so far after each run (the CLI writes them, so a long run can be stopped and kept)."""
    import lorakit as lk
    from ..core.inits import set_init_options
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train

    base, tokenizer = load_model_and_tokenizer(None)
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    runs = []
    for seed in profile.seeds:
        train_ex = load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed)
        for name in profile.contenders:
            method, kwargs, init, baseline = CONTENDERS[name]
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            warmup = max(1, round(0.1 * profile.steps))
            if init == "lora_sb":  # its η = lr / warmup steps of this very run (official train_arithmetic.py)
                set_init_options(model, "default", lr=profile.lr, warmup_steps=warmup)
            if init == "eva":  # short completions: give the PCA more passes over the init batches to converge
                set_init_options(model, "default", max_passes=50)
            lk.add_adapter(model, _config(method, kwargs, profile.r), init=init)
            config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                                 warmup_steps=warmup, warmup_ratio=0.0, lr_schedule="cosine", seed=seed,
                                 max_length=128, eval_every=profile.eval_every, init_batches=profile.init_batches,
                                 eval_examples=len(eval_ex))
            try:
                result = train(model, tokenizer, train_ex, config, eval_examples=eval_ex, progress=progress)
            except lk.LorakitError as e:
                runs.append({"contender": name, "seed": seed, "skipped": str(e)})
                continue
            trainable, _ = lk.trainable_parameters(model)
            runs.append({"contender": name, "baseline": baseline, "seed": seed, "losses": result.losses,
                         "eval": [(h["step"], h["exact_match"]) for h in result.eval_history],
                         "trainable_params": trainable, "wall_time_s": result.wall_time_s})
            if progress:
                print(name, seed, f"loss {result.losses[-1]:.3f}", result.eval_history[-1]["exact_match"], flush=True)
            if after_each is not None:
                after_each({"runs": runs, "table": summarise(runs, profile)})
    return {"runs": runs, "table": summarise(runs, profile)}


def summarise(runs: list[dict], profile: InitProfile) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "skipped" not in r:
            groups.setdefault(r["contender"], []).append(r)
    rows = []
    for name, rs in groups.items():
        finals = [r["eval"][-1][1] for r in rs]
        mean_curve = [statistics.mean(v) for v in zip(*[r["losses"] for r in rs])]
        rows.append({"contender": name, "baseline": rs[0]["baseline"], "seeds": len(rs),
                     "trainable_params": rs[0]["trainable_params"],
                     "loss_step1": mean_curve[0], "loss_at_quarter": mean_curve[len(mean_curve) // 4 - 1],
                     "final_loss": statistics.mean(statistics.mean(r["losses"][-5:]) for r in rs),
                     "exact_match_mean": statistics.mean(finals),
                     "exact_match_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "eval_curve": [(s, statistics.mean(v)) for s, *v in
                                    [(e[0][0], *[x[1] for x in e]) for e in zip(*[r["eval"] for r in rs])]]})
    return rows


# -- init cost against PEFT, one child process per measurement ------------------------------------------------
COST_SCRIPT = r'''
import json, sys, threading, time, os
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
lib, init, device, layers, hidden = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=layers,
    num_attention_heads=8, num_key_value_heads=8, vocab_size=2048, max_position_embeddings=256)).to(device)
g = torch.Generator().manual_seed(1)
batches = []
for _ in range(8):
    x = torch.randint(0, 2048, (4, 64), generator=g).to(device)
    batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
if lib == "peft":
    import peft
    from peft.tuners.lora.loraga import preprocess_loraga
    from peft.tuners.lora.eva import initialize_lora_eva_weights
else:
    import lorakit as lk

def run(model, batches):
    if lib == "peft":
        kw = {"lora_ga_config": peft.LoraGAConfig()} if init == "lora_ga" else {}
        kw.update({"eva_config": peft.EvaConfig()} if init == "eva" else {})
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=init, **kw)
        if init == "lora_ga":
            def step():
                for b in batches:
                    model(**b).loss.backward()
            preprocess_loraga(model, config, step)
        m = peft.get_peft_model(model, config)
        if init == "eva":
            initialize_lora_eva_weights(m, batches, show_progress_bar=False)
    else:
        lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=targets), init=init,
                       init_batches=batches if init in ("lora_ga", "eva") else None)

# warm-up on a tiny model: lazy imports and first-call costs stay out of the measurement, for both libraries
tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256)).to(device)
run(tiny, [{k: v[:, :32] for k, v in b.items()} for b in batches])
del tiny
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
start_mem = torch.cuda.memory_allocated() if device == "cuda" else rss()
peak[0] = start_mem
thread = threading.Thread(target=sample, daemon=True)
if device != "cuda":
    thread.start()
t0 = time.perf_counter()
run(model, batches)
if device == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
stop.set()
if device == "cuda":
    extra = torch.cuda.max_memory_allocated() - start_mem
else:
    thread.join()
    extra = max(peak[0], rss()) - start_mem
print(json.dumps({"wall_s": wall, "peak_extra_mb": extra / 2**20}))
'''


def run_cost(profile: InitProfile, device: str = "cpu", timeout_s: float = 900) -> dict:
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(profile.cost_repeats):
        for init in profile.cost_inits:
            for lib in ("lorakit", "peft"):
                try:
                    argv = [lib, init, device, str(profile.cost_layers), str(profile.cost_hidden)]
                    out = subprocess.run([sys.executable, "-c", COST_SCRIPT, *argv], capture_output=True,
                                         text=True, check=True, timeout=timeout_s)
                except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:  # e.g. EVA never converging
                    samples.setdefault((init, lib), []).append({"error": f"{type(e).__name__}: {str(e)[-200:]}"})
                    continue
                samples.setdefault((init, lib), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for init in profile.cost_inits:
        ours = [x for x in samples[(init, "lorakit")] if "error" not in x]
        ref = [x for x in samples[(init, "peft")] if "error" not in x]
        if not ours or not ref:
            errors = [x["error"] for lib in ("lorakit", "peft") for x in samples[(init, lib)] if "error" in x]
            rows.append({"init": init, "error": errors[0] if errors else "no sample"})
            continue
        t_ours = statistics.median(s["wall_s"] for s in ours)
        t_ref = statistics.median(s["wall_s"] for s in ref)
        m_ours = statistics.median(s["peak_extra_mb"] for s in ours)
        m_ref = statistics.median(s["peak_extra_mb"] for s in ref)
        rows.append({"init": init, "lorakit_s": t_ours, "peft_s": t_ref, "time_ratio": t_ours / t_ref,
                     "lorakit_peak_extra_mb": m_ours, "peft_peak_extra_mb": m_ref,
                     "memory_ratio": m_ours / m_ref if m_ref > 0 else None, "repeats": len(ours)})
    return {"device": device, "rows": rows}


def run_inits(profile: InitProfile, device: str | None = None, progress: bool = False,
              parts: tuple[str, ...] = ("convergence", "cost"), after_each=None) -> dict:
    """``parts``: which halves to run; ``after_each(result)`` gets the partial result after each training run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"profile": asdict(profile), "convergence": {"runs": [], "table": []}, "cost": {"device": device, "rows": []}}

    def partial(conv: dict) -> None:
        result["convergence"] = conv
        if after_each is not None:
            after_each(result)

    if "convergence" in parts:
        result["convergence"] = run_convergence(profile, progress=progress, after_each=partial)
    if "cost" in parts:
        result["cost"] = run_cost(profile, device)
    return result


def inits_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Bundled model, tasks `{p['tasks']}`, {p['steps']} steps × batch {p['batch_size']}, lr {p['lr']} "
             f"(cosine, 10% warmup), r={p['r']} all-linear, data-driven inits on {p['init_batches']} batches, "
             f"seeds {list(p['seeds'])}; exact match on {p['eval_examples']} test examples per task.", "",
             "| init | vs | seeds | trainable params | loss step 1 | loss at K/4 | final loss (last 5) | "
             "exact match at K (mean ± sd) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["convergence"]["table"]:
        lines.append(f"| {r['contender']} | {r['baseline']} | {r['seeds']} | {r['trainable_params']:,} | "
                     f"{r['loss_step1']:.3f} | {r['loss_at_quarter']:.3f} | {r['final_loss']:.3f} | "
                     f"{r['exact_match_mean']:.3f} ± {r['exact_match_sd']:.3f} |")
    skipped = [r for r in result["convergence"]["runs"] if "skipped" in r]
    for r in skipped:
        lines.append(f"| {r['contender']} | | seed {r['seed']} skipped: {r['skipped'][:80]} | | | | | |")
    c = result["cost"]
    lines += ["", f"Init cost against PEFT ({c['device']}; random Llama {p['cost_layers']} layers × hidden "
              f"{p['cost_hidden']}, r=8 on all 7 projections, 8 batches of 4×64 tokens; medians over "
              f"{p['cost_repeats']} interleaved child processes each):", "",
              "| init | lorakit s | PEFT s | time lorakit/PEFT | lorakit peak extra MB | PEFT peak extra MB | "
              "memory lorakit/PEFT |", "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        if "error" in r:
            lines.append(f"| {r['init']} | | | failed: {r['error'][:100]} | | | |")
            continue
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "n/a"
        lines.append(f"| {r['init']} | {r['lorakit_s']:.2f} | {r['peft_s']:.2f} | {r['time_ratio']:.2f} | "
                     f"{r['lorakit_peak_extra_mb']:.0f} | {r['peft_peak_extra_mb']:.0f} | {mr} |")
    return "\n".join(lines) + "\n"


def plot_inits(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["convergence"]["runs"] if "skipped" not in r]
    names = list(dict.fromkeys(r["contender"] for r in runs))
    by_seed_count = {n: len([r for r in runs if r["contender"] == n]) for n in names}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        rs = [r for r in runs if r["contender"] == name]
        curve = [statistics.mean(v) for v in zip(*[r["losses"] for r in rs])]
        style = "--" if name == rs[0]["baseline"] else "-"
        ax1.plot(range(1, len(curve) + 1), curve, style, color=cmap(i), label=f"{name} ({by_seed_count[name]} seeds)",
                 linewidth=1.2)
        evals = [statistics.mean(v) for v in zip(*[[e[1] for e in r["eval"]] for r in rs])]
        ax2.plot([e[0] for e in rs[0]["eval"]], evals, style + "o", color=cmap(i), label=name, markersize=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (mean over seeds)")
    ax1.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("exact match (mean over seeds)")
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle("Initialisations vs their default init at equal rank (dashed: baselines)")
    fig.tight_layout()
    path = out / "init.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
