"""``lorakit bench init``: each registered init against the default init at equal rank, on the bundled model
(loss and exact match over the first K steps, per seed; LoftQ against QLoRA on the same NF4 base, ``NF4_BASE``), and the cost of running an init side by side with PEFT
(wall time and peak memory of LoRA-GA, EVA and PiSSA on a random 8-layer, 512-hidden Llama).

Cost is measured in one child process per (init, library, repeat), the repeats interleaved so machine noise hits
both libraries alike: wall time and CPU time (of the measuring thread: on the shared machine other processes
stretch the wall time, much less the CPU time) of "attach the adapter + run the init" and the peak resident
memory above the memory just before (sampled every millisecond with psutil, which reads /proc/self/statm on Linux;
on CUDA, the allocator's peak).

EVA runs its incremental PCA until every layer's components stop moving (cosine >= tau); on the random model's
layer inputs that does not happen within minutes in either library (PEFT cycles the batches with no other stop).
So both are stopped at the same point, the start of forward pass ``EVA_FORWARDS + 1`` (one pass to find layers
with equal inputs, then ``EVA_FORWARDS`` IPCA steps = two passes over the 8 batches): the row compares the cost
of the same EVA work, and says whether either converged before the cap.
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

from . import save_figure
from ..core.errors import check_names, did_you_mean

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
    "qlora": ("lora", {}, None, "qlora"),
    "loftq": ("lora", {}, "loftq", "qlora"),
}
# contenders trained on the NF4 base (QLoRA), without double quantization: LoftQ's own quantizer (init/loftq.py), so
# at loftq_iter = 1 LoftQ's base and QLoRA's are the same q_N(W) and the two rows differ only in the adapter's start
# (the paper's comparison, arXiv:2310.08659 §4); LoftQ quantizes its base itself
NF4_BASE = ("qlora",)


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
    seeds: tuple[int, ...] = (0, 1, 2)
    # "NAME@LR" trains that contender at LR instead of ``lr`` (row "NAME@LR", compared with "BASELINE@LR")
    contenders: tuple[str, ...] = ("lora", "lora_ga", "eva", "lora_xs", "lora_sb", "pissa", "corda")
    cost_repeats: int = 2
    cost_inits: tuple[str, ...] = ("lora_ga", "eva", "pissa")
    cost_layers: int = 8
    cost_hidden: int = 512


PARTS = ("convergence", "cost")  # the halves of the bench (``--only``)
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


def parse_contender(spec: str, default_lr: float) -> tuple[str, float, str]:
    """``"pissa@2e-4"`` -> ("pissa", 2e-4, "lora@2e-4"): the contender, its lr, and the row it is compared with
    (its baseline at the same lr). ValueError names an unknown contender or a bad lr."""
    name, _, lr_text = spec.partition("@")
    if name not in CONTENDERS:
        raise ValueError(f"unknown init contender {name!r}.{did_you_mean(name, CONTENDERS)} Choose from "
                         f"{sorted(CONTENDERS)} (optionally NAME@LR).")
    try:
        lr = float(lr_text) if lr_text else default_lr
    except ValueError:
        raise ValueError(f"contender {spec!r}: {lr_text!r} is not a learning rate (write e.g. {name}@2e-4).") from None
    baseline = CONTENDERS[name][3]
    return name, lr, baseline + ("@" + lr_text if lr_text else "")


def set_bench_init_options(model, init: str | None, lr: float, warmup_steps: int, adapter_name: str = "default") -> None:
    """The options the benches give ``init`` on ``model`` before its adapter is added: LoRA-SB's η = lr / warmup
    steps of this very run (official ``train_arithmetic.py``); EVA more passes over the init batches (the bundled
    tasks' short completions need them for the PCA to converge). Other inits keep their defaults."""
    from ..core.inits import set_init_options

    if init == "lora_sb":
        set_init_options(model, adapter_name, lr=lr, warmup_steps=warmup_steps)
    elif init == "eva":
        set_init_options(model, adapter_name, max_passes=50)


TRAINING_FIELDS = ("tasks", "steps", "eval_every", "batch_size", "lr", "r", "init_batches", "train_examples",
                   "eval_examples")


def reusable_runs(previous: dict | None, profile: InitProfile) -> list[dict]:
    """The finished convergence runs of an earlier result made with the same training settings (else none)."""
    if not previous:
        return []
    old = previous.get("profile", {})
    if any(old.get(k) != getattr(profile, k) for k in TRAINING_FIELDS):
        return []
    return [r for r in previous.get("convergence", {}).get("runs", []) if "skipped" not in r]


def run_convergence(profile: InitProfile, progress: bool = False, after_each=None,
                    done: list[dict] | None = None) -> dict:
    """Every contender on every seed (seed-major, so an interrupted run has whole seeds); ``after_each(result)``
    gets the results so far after each run (the CLI writes them, so a long run can be stopped and kept).
    ``done``: finished runs (same training settings) kept as they are; their (contender, seed) are not rerun."""
    import lorakit as lk
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train

    base, tokenizer = load_model_and_tokenizer(None)
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    specs = {spec: parse_contender(spec, profile.lr) for spec in profile.contenders}
    runs = list(done or [])
    finished = {(r["contender"], r["seed"]) for r in runs}
    for seed in profile.seeds:
        train_ex = load_examples(profile.tasks, "train", n=profile.train_examples, seed=seed)
        for spec, (name, lr, baseline) in specs.items():
            if (spec, seed) in finished:
                continue
            method, kwargs, init, _ = CONTENDERS[name]
            model = copy.deepcopy(base)
            if name in NF4_BASE:
                from ..quantize import QuantizeConfig, quantize_model

                model = quantize_model(model, QuantizeConfig(double_quant=False))
            torch.manual_seed(seed)
            warmup = max(1, round(0.1 * profile.steps))
            set_bench_init_options(model, init, lr=lr, warmup_steps=warmup)
            lk.add_adapter(model, _config(method, kwargs, profile.r), init=init)
            config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=lr,
                                 warmup_steps=warmup, warmup_ratio=0.0, lr_schedule="cosine", seed=seed,
                                 max_length=128, eval_every=profile.eval_every, init_batches=profile.init_batches,
                                 eval_examples=len(eval_ex))
            try:
                result = train(model, tokenizer, train_ex, config, eval_examples=eval_ex, progress=progress)
            except lk.LorakitError as e:
                runs.append({"contender": spec, "seed": seed, "skipped": str(e)})
                continue
            trainable, _ = lk.trainable_parameters(model)
            runs.append({"contender": spec, "baseline": baseline, "lr": lr, "seed": seed, "losses": result.losses,
                         "eval": [(h["step"], h["exact_match"]) for h in result.eval_history],
                         "trainable_params": trainable, "wall_time_s": result.wall_time_s})
            if progress:
                print(spec, seed, f"loss {result.losses[-1]:.3f}", result.eval_history[-1]["exact_match"], flush=True)
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
        # paired with the baseline run of the same seed (same batches in the same order): the per-step loss varies
        # more from batch to batch than between inits, so the paired difference is the comparison to read
        by_seed = {r["seed"]: r for r in groups.get(rs[0]["baseline"], [])}
        quarter = len(mean_curve) // 4
        paired = [(statistics.mean(a - b for a, b in zip(r["losses"][:quarter], by_seed[r["seed"]]["losses"][:quarter])),
                   statistics.mean(a - b for a, b in zip(r["losses"], by_seed[r["seed"]]["losses"])))
                  for r in rs if r["seed"] in by_seed]
        rows.append({"contender": name, "baseline": rs[0]["baseline"], "lr": rs[0].get("lr", profile.lr), "seeds": len(rs),
                     "trainable_params": rs[0]["trainable_params"],
                     "loss_step1": mean_curve[0], "loss_at_quarter": mean_curve[len(mean_curve) // 4 - 1],
                     "final_loss": statistics.mean(statistics.mean(r["losses"][-5:]) for r in rs),
                     "exact_match_mean": statistics.mean(finals),
                     "exact_match_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "paired_seeds": len(paired),
                     "delta_loss_first_quarter": statistics.mean(p[0] for p in paired) if paired else None,
                     "delta_loss_all_steps": statistics.mean(p[1] for p in paired) if paired else None,
                     "eval_curve": [(s, statistics.mean(v)) for s, *v in
                                    [(e[0][0], *[x[1] for x in e]) for e in zip(*[r["eval"] for r in rs])]]})
    return rows


# -- init cost against PEFT, one child process per measurement ------------------------------------------------
EVA_FORWARDS = 17
COST_SCRIPT = r'''
import json, sys, threading, time, os
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
lib, init, device, layers, hidden = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cap = int(sys.argv[6])  # EVA: stop at the start of forward pass cap + 1 (both libraries)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=layers,
    num_attention_heads=8, num_key_value_heads=8, vocab_size=2048, max_position_embeddings=256)).to(device)
g = torch.Generator().manual_seed(1)
batches = []
for _ in range(8):
    x = torch.randint(0, 2048, (4, 64), generator=g).to(device)
    batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
import psutil
me = psutil.Process()
def rss():
    return me.memory_info().rss
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

class Capped(Exception):
    pass

def run_capped(model, batches):
    """run(); for EVA, stopped by an exception at the start of forward pass cap + 1. Returns (forwards, converged)."""
    count = [0]
    def pre(module, args, kwargs):
        count[0] += 1
        if count[0] > cap:
            raise Capped()
    handle = model.register_forward_pre_hook(pre, with_kwargs=True) if init == "eva" else None
    try:
        run(model, batches)
        return count[0], True
    except Capped:
        return count[0] - 1, False
    finally:
        if handle is not None:
            handle.remove()

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
run_capped(tiny, [{k: v[:, :32] for k, v in b.items()} for b in batches])
del tiny
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
start_mem = torch.cuda.memory_allocated() if device == "cuda" else rss()
peak[0] = start_mem
thread = threading.Thread(target=sample, daemon=True)
if device != "cuda":
    thread.start()
t0, c0 = time.perf_counter(), time.thread_time()
forwards, finished = run_capped(model, batches)
cpu = time.thread_time() - c0  # this thread only (torch runs single-threaded here; the sampler is another thread)
if device == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
stop.set()
if device == "cuda":
    extra = torch.cuda.max_memory_allocated() - start_mem
else:
    thread.join()
    extra = max(peak[0], rss()) - start_mem
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": extra / 2**20, "forwards": forwards,
                  "finished": finished}))
'''


def run_cost(profile: InitProfile, device: str = "cpu", timeout_s: float = 900, after_each=None) -> dict:
    """Init cost against PEFT; ``after_each(cost)`` gets the rows so far after every child process."""
    samples: dict[tuple[str, str], list[dict]] = {(i, lib): [] for i in profile.cost_inits for lib in ("lorakit", "peft")}
    for _ in range(profile.cost_repeats):
        for init in profile.cost_inits:
            for lib in ("lorakit", "peft"):
                try:
                    argv = [lib, init, device, str(profile.cost_layers), str(profile.cost_hidden), str(EVA_FORWARDS)]
                    out = subprocess.run([sys.executable, "-c", COST_SCRIPT, *argv], capture_output=True,
                                         text=True, check=True, timeout=timeout_s)
                    samples[(init, lib)].append(json.loads(out.stdout.strip().splitlines()[-1]))
                except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
                    samples[(init, lib)].append({"error": f"{type(e).__name__}: {str(e)[-200:]}"})
                if after_each is not None:
                    after_each({"device": device, "rows": cost_rows(samples, profile.cost_inits)})
    return {"device": device, "rows": cost_rows(samples, profile.cost_inits)}


def cost_rows(samples: dict[tuple[str, str], list[dict]], inits: tuple[str, ...]) -> list[dict]:
    """Medians per init and library, and the lorakit/PEFT ratios (an error row where a library has no sample)."""
    rows = []
    for init in inits:
        ours = [x for x in samples[(init, "lorakit")] if "error" not in x]
        ref = [x for x in samples[(init, "peft")] if "error" not in x]
        if not ours or not ref:
            errors = [x["error"] for lib in ("lorakit", "peft") for x in samples[(init, lib)] if "error" in x]
            rows.append({"init": init, "error": errors[0] if errors else "no sample yet"})
            continue
        t_ours = statistics.median(s["wall_s"] for s in ours)
        t_ref = statistics.median(s["wall_s"] for s in ref)
        m_ours = statistics.median(s["peak_extra_mb"] for s in ours)
        m_ref = statistics.median(s["peak_extra_mb"] for s in ref)
        cpu = [statistics.median(s["cpu_s"] for s in xs) if all("cpu_s" in s for s in xs) else None for xs in (ours, ref)]
        rows.append({"init": init, "lorakit_s": t_ours, "peft_s": t_ref, "time_ratio": t_ours / t_ref,
                     "lorakit_cpu_s": cpu[0], "peft_cpu_s": cpu[1],
                     "cpu_ratio": cpu[0] / cpu[1] if None not in cpu else None,
                     "cpu_ratio_per_repeat": [a["cpu_s"] / b["cpu_s"] for a, b in zip(ours, ref)
                                              if "cpu_s" in a and "cpu_s" in b],
                     "lorakit_peak_extra_mb": m_ours, "peft_peak_extra_mb": m_ref,
                     "memory_ratio": m_ours / m_ref if m_ref > 0 else None, "repeats": min(len(ours), len(ref)),
                     "time_ratio_per_repeat": [a["wall_s"] / b["wall_s"] for a, b in zip(ours, ref)],
                     "memory_ratio_per_repeat": [a["peak_extra_mb"] / b["peak_extra_mb"] for a, b in zip(ours, ref)
                                                 if b["peak_extra_mb"] > 0],
                     "finished": {"lorakit": [s.get("finished", True) for s in ours],
                                  "peft": [s.get("finished", True) for s in ref]},
                     "forwards": {"lorakit": [s.get("forwards") for s in ours], "peft": [s.get("forwards") for s in ref]}})
    return rows


def run_inits(profile: InitProfile, device: str | None = None, progress: bool = False,
              parts: tuple[str, ...] = PARTS, after_each=None, previous: dict | None = None) -> dict:
    """``parts``: which halves to run (of ``PARTS``; ConfigError for another name); ``after_each(result)`` gets the
    partial result after each training run. ``previous``: an earlier result to resume: its training runs made with
    the same settings are kept (not rerun), and the half not run this time is carried over as it was."""
    check_names(parts, PARTS, "bench init part")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"profile": asdict(profile), "convergence": {"runs": [], "table": []}, "cost": {"device": device, "rows": []}}
    done = reusable_runs(previous, profile)
    if previous and "convergence" not in parts and done:
        result["convergence"] = {"runs": done, "table": summarise(done, profile)}
    if previous and "cost" not in parts and previous.get("cost", {}).get("rows"):
        result["cost"] = previous["cost"]
        result["profile"]["cost_repeats"] = previous.get("profile", {}).get("cost_repeats", profile.cost_repeats)

    def partial(conv: dict) -> None:
        result["convergence"] = conv
        if after_each is not None:
            after_each(result)

    if "convergence" in parts:
        result["convergence"] = run_convergence(profile, progress=progress, after_each=partial, done=done)
    if "cost" in parts:
        def partial_cost(cost: dict) -> None:
            result["cost"] = cost
            if after_each is not None:
                after_each(result)

        result["cost"] = run_cost(profile, device, after_each=partial_cost)
    return result


def inits_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Bundled model, tasks `{p['tasks']}`, {p['steps']} steps × batch {p['batch_size']}, lr {p['lr']} "
             f"unless the row says (NAME@LR), cosine, 10% warmup, r={p['r']} all-linear, data-driven inits on "
             f"{p['init_batches']} batches, seeds {list(p['seeds'])}; exact match on {p['eval_examples']} test "
             "examples per task. qlora: LoRA on the NF4 base (no double quantization); loftq quantizes the base "
             "itself, to the same NF4 values at loftq_iter = 1.", "",
             "| init | vs | lr | seeds | trainable params | loss step 1 | loss at K/4 | final loss (last 5) | "
             "Δ loss vs baseline, steps 1..K/4 (paired by seed) | Δ loss vs baseline, all K steps | "
             "exact match at K (mean ± sd) |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def delta(x):
        return "" if x is None else f"{x:+.3f}"

    for r in result["convergence"]["table"]:
        lines.append(f"| {r['contender']} | {r['baseline']} | {r.get('lr', p['lr']):g} | {r['seeds']} | "
                     f"{r['trainable_params']:,} | "
                     f"{r['loss_step1']:.3f} | {r['loss_at_quarter']:.3f} | {r['final_loss']:.3f} | "
                     f"{delta(r.get('delta_loss_first_quarter'))} | {delta(r.get('delta_loss_all_steps'))} | "
                     f"{r['exact_match_mean']:.3f} ± {r['exact_match_sd']:.3f} |")
    skipped = [r for r in result["convergence"]["runs"] if "skipped" in r]
    for r in skipped:
        lines.append(f"| {r['contender']} | | | seed {r['seed']} skipped: {r['skipped'][:80]} | | | | | | | |")
    c = result["cost"]
    lines += ["", f"Init cost against PEFT ({c['device']}; random Llama {p['cost_layers']} layers × hidden "
              f"{p['cost_hidden']}, r=8 on all 7 projections, 8 batches of 4×64 tokens; medians over up to "
              f"{p['cost_repeats']} interleaved child processes each; EVA stopped in both libraries at the start of "
              f"forward pass {EVA_FORWARDS + 1}, see the module docstring):", "",
              "| init | repeats | lorakit s | PEFT s | wall time lorakit/PEFT (per repeat) | CPU time lorakit/PEFT "
              "(per repeat) | lorakit peak extra MB | PEFT peak extra MB | memory lorakit/PEFT (per repeat) | "
              "finished (lorakit / PEFT) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        if "error" in r:
            lines.append(f"| {r['init']} | | | | failed: {r['error'][:100]} | | | | | |")
            continue
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "n/a"
        each_t = ", ".join(f"{x:.2f}" for x in r.get("time_ratio_per_repeat", []))
        each_m = ", ".join(f"{x:.2f}" for x in r.get("memory_ratio_per_repeat", []))
        fin = r.get("finished", {})
        done = " / ".join("yes" if all(fin.get(lib, [True])) else
                          f"capped at {max(f for f in r['forwards'][lib] if f is not None)} forwards"
                          for lib in ("lorakit", "peft"))
        each_c = ", ".join(f"{x:.2f}" for x in r.get("cpu_ratio_per_repeat", []))
        cr = f"**{r['cpu_ratio']:.2f}** ({each_c})" if r.get("cpu_ratio") is not None else "n/a"
        lines.append(f"| {r['init']} | {r.get('repeats', p['cost_repeats'])} | {r['lorakit_s']:.2f} | "
                     f"{r['peft_s']:.2f} | **{r['time_ratio']:.2f}** ({each_t}) | {cr} | {r['lorakit_peak_extra_mb']:.0f} | "
                     f"{r['peft_peak_extra_mb']:.0f} | **{mr}** ({each_m}) | {done} |")
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
