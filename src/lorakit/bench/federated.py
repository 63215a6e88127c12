"""``lorakit bench federated``: the federated strategies side by side on the bundled model and built-in tasks.

Per strategy (and with DP-SGD for FedIT and FFA-LoRA, the pair FFA-LoRA's paper compares under noise), per seed:
held-out exact match and token loss of the global model after every round, next to centralized training (one
LoRA on the union of the clients' data for the same total number of optimizer steps), bytes sent per round per
client (uplink, downlink), and ε for the DP runs. Plus the aggregation check on real round-1 client updates:
FLoRA's stacked product against the mean of the client ΔWs (exact up to float rounding) and FedIT's error
on the same updates.

Runs use ``lorakit.federated.simulate.federate_in_process``: the client and server code Flower runs, without the
transport and Ray (``lorakit federate`` runs the same through Flower's simulation engine).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import save_figure


@dataclass
class FederatedProfile:
    strategies: tuple[str, ...] = ("fedit", "ffa", "flora", "lora_fair")
    dp_strategies: tuple[str, ...] = ("fedit", "ffa")
    # averaging strategies also run with the heterogeneous ``flora_ranks`` (FedIT zero-pads, FLoRA's baseline)
    hetero_strategies: tuple[str, ...] = ("fedit",)
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    clients: int = 4
    rounds: int = 5
    local_steps: int = 10
    tasks: str = "reverse,sort,upper,add"
    train_examples: int = 64
    eval_examples: int = 16
    r: int = 8
    flora_ranks: tuple[int, ...] = (16, 8, 4, 4)
    lr: float = 3e-3


QUICK = FederatedProfile(seeds=(0,), clients=2, rounds=2, local_steps=2, tasks="reverse,sort", train_examples=8,
                         eval_examples=4, r=2, flora_ranks=(4, 2))
FULL = FederatedProfile()


def _config(profile: FederatedProfile, strategy: str, seed: int, dp: bool, hetero: bool | None = None):
    from ..federated import FederatedConfig

    hetero = strategy == "flora" if hetero is None else hetero

    return FederatedConfig(
        strategy=strategy, clients=profile.clients, rounds=profile.rounds, data=profile.tasks,
        train_examples=profile.train_examples, eval_examples=profile.eval_examples, partition="task", r=profile.r,
        client_ranks=list(profile.flora_ranks) if hetero else None, local_steps=profile.local_steps,
        lr=profile.lr, seed=seed, dp_noise_multiplier=profile.dp_noise_multiplier if dp else 0.0,
        dp_max_grad_norm=profile.dp_max_grad_norm, target_modules=["q_proj", "v_proj"])


def centralized(profile: FederatedProfile, seed: int) -> dict:
    """One LoRA (rank r) on the union of the clients' data, rounds × local_steps × clients steps: the same
    number of examples seen as all clients together."""
    from ..core.model import delete_adapter
    from ..federated.client import attach, eval_examples, fresh_model, plain_train, train_examples
    from ..federated import get_strategy
    from ..federated.server import eval_loss
    from ..data import evaluate_examples

    config = _config(profile, "fedit", seed, dp=False)
    model, tokenizer = fresh_model(config)
    union = [ex for k in range(config.clients) for ex in train_examples(config, k, tokenizer)]
    attach(model, config, get_strategy(config), config.r, config.alpha_of(0), seed)
    steps = config.rounds * config.local_steps * config.clients
    torch.manual_seed(seed)
    plain_train(model, tokenizer, union, replace(config, local_steps=steps), 0, 0)
    held_out = eval_examples(config, tokenizer)
    metrics = {"exact_match": float(evaluate_examples(model, tokenizer, held_out, batch_size=64)["exact_match"]),
               "eval_loss": eval_loss(model, tokenizer, held_out, config.max_length), "steps": steps}
    delete_adapter(model, "default")
    return metrics


def aggregation_check(profile: FederatedProfile, seed: int) -> dict:
    """Round-1 client updates of a FedIT run (one rank) and of a FLoRA run (heterogeneous ranks): relative error
    of FedIT's s·B̄Ā and of FLoRA's stacked product against Σ_k p_k s_k B_k A_k, worst module."""
    from ..federated import get_strategy
    from ..federated.base import normalized
    from ..federated.fedit import fedit_error
    from ..federated.simulate import federate_in_process

    out = {}
    for strategy in ("fedit", "flora"):
        config = replace(_config(profile, strategy, seed, dp=False), rounds=1, evaluate=False)
        run = federate_in_process(config, keep_updates=True)
        updates = [u for _, u, _ in run["first_updates"]]
        weights = normalized([m["num-examples"] for _, _, m in run["first_updates"]])
        scales = [config.alpha_of(c) / config.rank_of(c) for c, _, _ in run["first_updates"]]
        paths = [k[: -len(".lora_A")] for k in updates[0] if k.endswith(".lora_A")]
        ideal = {p: sum(w * s * u[p + ".lora_B"] @ u[p + ".lora_A"] for u, w, s in zip(updates, weights, scales))
                 for p in paths}
        if strategy == "fedit":
            error = fedit_error(updates, weights, scales[0])
        else:
            flora = get_strategy(config)
            empty = {**{f"{p}.stack_A": torch.zeros(0, updates[0][p + '.lora_A'].shape[1]) for p in paths},
                     **{f"{p}.stack_B": torch.zeros(updates[0][p + '.lora_B'].shape[0], 0) for p in paths}}
            delta = flora.global_delta(flora.aggregate(empty, updates, weights, scales), 1.0)
            error = {p: delta[p] - ideal[p] for p in paths}
        out[strategy] = max(float(error[p].norm() / ideal[p].norm().clamp(min=1e-30)) for p in paths)
    return {"fedit_relative_error": out["fedit"], "flora_relative_error": out["flora"]}


def run_federated_bench(profile: FederatedProfile, progress: bool = True) -> dict:
    from ..federated.simulate import federate_in_process

    runs = []
    plan = ([(s, False, None) for s in profile.strategies] + [(s, True, None) for s in profile.dp_strategies]
            + [(s, False, True) for s in profile.hetero_strategies if s != "flora"])
    for seed in profile.seeds:
        for strategy, dp, hetero in plan:
            config = _config(profile, strategy, seed, dp, hetero)
            result = federate_in_process(config)
            rounds = result["rounds"]
            label = strategy + (f" (ranks {','.join(map(str, profile.flora_ranks))}, zero-padded)" if hetero else "")
            runs.append({"strategy": strategy, "label": label, "dp": dp, "seed": seed,
                         "client_ranks": config.client_ranks, "evaluation": result["evaluation"],
                         "uplink_bytes": statistics.mean(r["uplink_bytes_per_client"] for r in rounds),
                         "downlink_bytes": [r["downlink_bytes_per_client"] for r in rounds],
                         "epsilon": rounds[-1].get("epsilon"), "rejected": sum(len(r["rejected"]) for r in rounds)})
            if progress:
                last = result["evaluation"][-1]
                print(f"{label}{' +DP' if dp else ''} seed {seed}: exact match {last['exact_match']:.3f}, "
                      f"eval loss {last['eval_loss']:.4f}", flush=True)
    central = [centralized(profile, seed) for seed in profile.seeds]
    check = aggregation_check(profile, profile.seeds[0])
    return {"profile": profile.__dict__, "runs": runs, "centralized": central, "aggregation": check}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def federated_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"{p['clients']} clients (split by task), {p['rounds']} rounds × {p['local_steps']} local steps, tasks "
             f"{p['tasks']}, {p['train_examples']} train / {p['eval_examples']} held-out examples per task, rank "
             f"{p['r']} (FLoRA ranks {list(p['flora_ranks'])}), seeds {list(p['seeds'])}. Metric: exact match and "
             "token loss of the global model on the held-out examples after the last round (mean over seeds).", "",
             "| run | exact match | eval loss | uplink KiB / client / round | downlink KiB / client (last round) | ε |",
             "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.get("label", r["strategy"]), r["dp"]) for r in result["runs"]))
    for strategy, dp in keys:
        rs = [r for r in result["runs"] if r.get("label", r["strategy"]) == strategy and r["dp"] == dp]
        em = _mean([r["evaluation"][-1]["exact_match"] for r in rs])
        loss = _mean([r["evaluation"][-1]["eval_loss"] for r in rs])
        eps = _mean([r["epsilon"] for r in rs])
        lines.append(f"| {strategy}{' + DP-SGD (σ=' + str(p['dp_noise_multiplier']) + ')' if dp else ''} | {em:.3f} | "
                     f"{loss:.4f} | {_mean([r['uplink_bytes'] for r in rs]) / 1024:.1f} | "
                     f"{_mean([r['downlink_bytes'][-1] for r in rs]) / 1024:.1f} | {'' if eps is None else f'{eps:.2f}'} |")
    c = result["centralized"]
    lines.append(f"| centralized (union of the data, {c[0]['steps']} steps) | {_mean([x['exact_match'] for x in c]):.3f} "
                 f"| {_mean([x['eval_loss'] for x in c]):.4f} | | | |")
    base = _mean([r["evaluation"][0]["exact_match"] for r in result["runs"]])
    lines += [f"| base model (round 0) | {base:.3f} | {_mean([r['evaluation'][0]['eval_loss'] for r in result['runs']]):.4f} | | | |",
              "", "Aggregation on real round-1 client updates (worst module, ‖aggregated ΔW − Σ p_k s_k B_k A_k‖ / "
              "‖Σ p_k s_k B_k A_k‖):", "",
              f"- FLoRA stacking: {result['aggregation']['flora_relative_error']:.2e} (exact up to float rounding)",
              f"- FedIT (average A, average B): {result['aggregation']['fedit_relative_error']:.2e}", ""]
    return "\n".join(lines)


def plot_federated(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(dict.fromkeys((r.get("label", r["strategy"]), r["dp"]) for r in result["runs"]))
    cmap = plt.get_cmap("tab10")
    for i, (strategy, dp) in enumerate(keys):
        rs = [r for r in result["runs"] if r.get("label", r["strategy"]) == strategy and r["dp"] == dp]
        rounds = [e["round"] for e in rs[0]["evaluation"]]
        for ax, key in ((ax1, "exact_match"), (ax2, "eval_loss")):
            curve = [statistics.mean(v) for v in zip(*[[e[key] for e in r["evaluation"]] for r in rs])]
            ax.plot(rounds, curve, "--o" if dp else "-o", color=cmap(i % 10), markersize=3,
                    label=f"{strategy}{' + DP' if dp else ''}")
    for ax, key in ((ax1, "exact_match"), (ax2, "eval_loss")):
        ax.axhline(_mean([c[key] for c in result["centralized"]]), color="black", linestyle=":", label="centralized")
        ax.set_xlabel("round")
        ax.set_ylabel(key.replace("_", " ") + " (held out, mean over seeds)")
    ax1.legend(fontsize=7)
    fig.suptitle("Federated LoRA strategies: global model per round")
    fig.tight_layout()
    path = out / "federated.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
