"""``lorakit bench reparam``: the parameter-sharing / random-basis re-parameterisations of issue 16 (NOLA, RandLoRA,
MoS, S2-LoRA, MiSS, LaMDA, LaMDA++) against LoRA on the bundled model, in one run on the same tasks, data, steps
and seeds.

- LoRA at ranks 1..r is the parameters-vs-exact-match reference curve; every method is a point on the same plot
  (``reparam_params.png``), so "equal trainable parameters" reads off the curve;
- per method: trainable parameters (× LoRA r=1), exact match, final loss, s/step;
- training step time as a ratio to LoRA r's, measured interleaved in the same run (``interleaved_step_times``);
- training memory, accounted (CPU has no allocator peak): activations autograd saves in one forward
  (``SavedActivations``) + gradients + AdamW state (2 floats per trainable parameter) — LaMDA's claim is on this.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import save_figure


@dataclass
class ReparamProfile:
    tasks: str = "reverse,rotate,sort,upper"
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 4
    train_examples: int = 1000
    eval_examples: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("nola", "randlora", "mos", "s2lora", "miss", "lamda", "lamda_pp")
    timing_rounds: int = 6  # interleaved step-time rounds (3 steps of every contender per round)


QUICK = ReparamProfile(steps=3, batch_size=4, train_examples=20, eval_examples=4, seeds=(0,), tasks="reverse,add", r=2,
                       methods=("mos", "lamda"), timing_rounds=2)
FULL = ReparamProfile()


def contenders(profile: ReparamProfile) -> dict:
    """name -> adapter config, all-linear. Settings: each paper's shape scaled to the bundled 6-layer model.

    MoS at LoRA r=1's parameters (pools of e = 1, no private shards, l = 2, rank r per layer); NOLA with 16 + 16
    coefficients per module (a fraction of LoRA r=1); S2-LoRA rank r shared per shape; RandLoRA, MiSS, LaMDA(++) at
    their registered default variant with rank r (α = 2r where the method has one)."""
    import lorakit as lk
    from .methods import _config_for

    r = profile.r
    special = {"mos": dict(r=r, lora_alpha=2 * r, valid_param_lora_r=1, valid_param_private_r=0, num_chunk_per_vec=2),
               "nola": dict(r=r, lora_alpha=2 * r, num_basis_A=16, num_basis_B=16)}
    out = {f"lora_r{k}": lk.LoraConfig(r=k, lora_alpha=2 * k, target_modules="all-linear") for k in range(1, r + 1)}
    for name in profile.methods:
        method = lk.get_method(name)
        if name in special:
            out[name] = method.config_cls(target_modules="all-linear", **special[name])
        else:
            out[name] = _config_for(method, next(iter(method.benchmark_variants())), r)
    return out


def training_memory(model, batch) -> dict:
    """Accounted bytes of one training step: saved activations + gradients + AdamW state (2 × trainable)."""
    from .timing import SavedActivations

    model.train()
    with SavedActivations() as saved:
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"activations": saved.bytes, "gradients": grads, "optimizer": 2 * trainable,
            "total": saved.bytes + grads + 2 * trainable}


def run_step_times(profile: ReparamProfile, steps_per_round: int = 3) -> dict:
    """Only the interleaved training-step-time ratios vs LoRA r (``lorakit bench reparam --step-time``): the
    ratio depends on the tokens per step (``--batch-size``), since full-rank updates (RandLoRA) pay a per-step
    cost of building ΔW that LoRA does not."""
    from .variants import interleaved_step_times

    configs = contenders(profile)
    ref = f"lora_r{profile.r}"
    timed = {("lora" if k == ref else k): v for k, v in configs.items() if k == ref or not k.startswith("lora_r")}
    rows = interleaved_step_times(timed, profile.tasks, profile.batch_size, profile.lr, profile.steps,
                                  rounds=profile.timing_rounds, steps_per_round=steps_per_round)
    return {"profile": asdict(profile), "rounds": profile.timing_rounds, "steps_per_round": steps_per_round,
            "rows": rows}


def run_reparam(profile: ReparamProfile, progress: bool = False) -> dict:
    import lorakit as lk
    from ..data import CausalLMCollator, TokenizedDataset, evaluate_examples, load_examples
    from ..hub import load_model_and_tokenizer
    from ..training import TrainConfig, train
    from .variants import interleaved_step_times

    base, tokenizer = load_model_and_tokenizer(None)
    train_ex = {s: load_examples(profile.tasks, "train", n=profile.train_examples, seed=s) for s in profile.seeds}
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    dataset = TokenizedDataset(train_ex[profile.seeds[0]][: profile.batch_size], tokenizer, max_length=128)
    batch = CausalLMCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    configs = contenders(profile)
    runs, memory = [], {}
    for name, config in configs.items():
        for seed in profile.seeds:
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            lk.add_adapter(model, config)
            trainable, _ = lk.trainable_parameters(model)
            if seed == profile.seeds[0]:
                memory[name] = training_memory(model, batch)
            tc = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                             warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine", seed=seed,
                             max_length=128, log_every=1)
            t0 = time.perf_counter()
            result = train(model, tokenizer, train_ex[seed], tc, progress=progress)
            runs.append({"method": name, "seed": seed, "trainable_params": trainable,
                         "trainable_params_end": lk.trainable_parameters(model)[0],
                         "final_loss": result.losses[-1], "s_per_step": (time.perf_counter() - t0) / profile.steps,
                         "after": evaluate_examples(model, tokenizer, eval_ex)["exact_match"]})
    ref = f"lora_r{profile.r}"
    timed = {("lora" if k == ref else k): v for k, v in configs.items() if k == ref or not k.startswith("lora_r")}
    step_times = interleaved_step_times(timed, profile.tasks, profile.batch_size, profile.lr, profile.steps,
                                        rounds=profile.timing_rounds)
    return {"profile": asdict(profile), "before": evaluate_examples(base, tokenizer, eval_ex)["exact_match"],
            "runs": runs, "memory": memory, "step_times": step_times, "table": summarise(runs, memory, step_times, ref)}


def summarise(runs: list[dict], memory: dict, step_times: list[dict], ref: str) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    lora1 = by["lora_r1"][0]["trainable_params"]
    ratio = {row["method"]: row.get("ratio_vs_lora") for row in step_times}
    rows = []
    for name, rs in by.items():
        after = [r["after"] for r in rs]
        rows.append({"method": name, "seeds": len(rs), "after_mean": statistics.mean(after),
                     "after_std": statistics.stdev(after) if len(after) > 1 else 0.0,
                     "trainable_params": rs[0]["trainable_params"], "trainable_params_end": rs[0]["trainable_params_end"],
                     "params_vs_lora_r1": rs[0]["trainable_params"] / lora1,
                     "final_loss": statistics.mean(r["final_loss"] for r in rs),
                     "s_per_step": statistics.median(r["s_per_step"] for r in rs),
                     "step_vs_lora": ratio.get("lora" if name == ref else name),
                     "memory_mib": memory[name]["total"] / 2**20,
                     "memory_vs_lora": memory[name]["total"] / memory[ref]["total"],
                     "activations_vs_lora": memory[name]["activations"] / memory[ref]["activations"]})
    return rows


def reparam_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Tasks `{p['tasks']}`, {p['steps']} steps × batch {p['batch_size']}, lr {p['lr']}, all-linear, seeds "
             f"{list(p['seeds'])}, LoRA ranks 1..{p['r']} as the reference curve. Exact match before training: "
             f"{result['before']:.3f}. Step time × LoRA: interleaved in the same run against LoRA r={p['r']} (median "
             "of per-round ratios). Memory: accounted bytes of one training step (saved activations + gradients + "
             "AdamW state), × LoRA r=" + str(p["r"]) + ".", "",
             "| method | exact match (mean ± sd) | trainable params (× LoRA r=1) | trainable at end | final loss | "
             "step time × LoRA | memory MiB (× LoRA) | activations × LoRA |", "|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        step = f"{r['step_vs_lora']:.2f}×" if r["step_vs_lora"] is not None else "—"
        lines.append(f"| {r['method']} | {r['after_mean']:.3f} ± {r['after_std']:.3f} | {r['trainable_params']:,} "
                     f"({r['params_vs_lora_r1']:.3f}×) | {r['trainable_params_end']:,} | {r['final_loss']:.3f} | {step} | "
                     f"{r['memory_mib']:.1f} ({r['memory_vs_lora']:.2f}×) | {r['activations_vs_lora']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot_reparam(result: dict, out_dir: Path) -> list[Path]:
    """Trainable parameters (log x) vs exact match: the LoRA rank curve and one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    lora = sorted((r for r in rows if r["method"].startswith("lora_r")), key=lambda r: r["trainable_params"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([r["trainable_params"] for r in lora], [r["after_mean"] for r in lora],
                yerr=[r["after_std"] for r in lora], marker="o", color="black", label="LoRA r=1..")
    for r in rows:
        if not r["method"].startswith("lora_r"):
            ax.errorbar(r["trainable_params"], r["after_mean"], yerr=r["after_std"], marker="s", linestyle="none",
                        label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("exact match")
    ax.axhline(result["before"], color="grey", linestyle=":", label="base model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reparam_params.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return [path]
