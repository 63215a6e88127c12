"""Table + json of the RegMix comparison at the bundled base's shape (benchmarks/regmix/bundled.sh).

    python benchmarks/regmix/bundled_table.py runs/regmix-bundled [--json benchmarks/regmix/bundled.json]

Reads RUN_DIR/{regmix,uniform,natural}/pretrain_info.json (a mixture not finished yet is left out), prints the
per-domain held-out loss table, and the proxy-size ranking of the same three mixtures (compare64_seed*.json,
mean of the seeds) beside the bundled-shape ranking.
"""

import argparse
import json
from pathlib import Path

here = Path(__file__).parent
parser = argparse.ArgumentParser()
parser.add_argument("runs", type=Path)
parser.add_argument("--json", type=Path, default=None)
args = parser.parse_args()

rows = {}
for name in ("regmix", "uniform", "natural"):
    path = args.runs / name / "pretrain_info.json"
    if not path.exists():
        continue
    info = json.loads(path.read_text())
    losses = info["eval_loss_per_domain"]
    rows[name] = {"weights": info["corpus"]["weights"], "eval_loss_per_domain": losses,
                  "mean": round(sum(losses.values()) / len(losses), 4), "final_train_loss": info["final_loss"],
                  "steps": info["steps"], "tokens_seen": info["tokens_seen"], "n_params": info["n_params"],
                  "eval_blocks": info["corpus"]["eval_blocks"], "train_time_s": info["train_time_s"],
                  "train_cpu_s": info.get("train_cpu_s"),
                  # CPU seconds per step (one thread): the step cost without the wait for a core on a shared machine
                  "s_per_step": round(info.get("train_cpu_s", info["train_time_s"]) / info["steps"], 3),
                  "config": info["config"]}

proxy = {}
for path in sorted(here.glob("compare64_seed*.json")):
    for key, value in json.loads(path.read_text()).items():
        proxy.setdefault(key.split("/")[0], []).append(value["mean"])
proxy = {k: round(sum(v) / len(v), 4) for k, v in proxy.items()}

domains = ["code", "docstrings", "docs", "tasks"]
print("| mixture (code / docstrings / docs / tasks) | " + " | ".join(domains) + " | mean over domains | "
      "proxy-size mean (156k, 300 steps) | CPU s/step |")
print("|---|" + "---|" * (len(domains) + 3))
for name, r in rows.items():
    w = " / ".join(f"{r['weights'][d]:.3f}" for d in domains)
    print(f"| {name} ({w}) | " + " | ".join(f"{r['eval_loss_per_domain'][d]:.3f}" for d in domains)
          + f" | {r['mean']:.3f} | {proxy.get(name, float('nan')):.3f} | {r['s_per_step']} |")
ranking = sorted(rows, key=lambda n: rows[n]["mean"])
proxy_ranking = sorted((n for n in proxy if n in rows), key=proxy.get)
print(f"\nranking at the bundled shape: {' < '.join(ranking)}; at proxy size: {' < '.join(proxy_ranking)}")
if args.json:
    args.json.write_text(json.dumps({"runs": rows, "proxy_size_mean": proxy, "ranking": ranking,
                                     "proxy_ranking": proxy_ranking}, indent=2) + "\n")
