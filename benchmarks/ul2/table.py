"""The benchmarks/ul2 tables from runs/pretrain-small/{pre,ul2} and runs/ul2-lora/*: python benchmarks/ul2/table.py"""

import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
print("| base | objective | params | pretraining steps × tokens | final train loss (its objective) | held-out next-token loss |")
print("|---|---|---|---|---|---|")
for name in ("pre", "ul2"):
    info = json.loads((runs / "pretrain-small" / name / "pretrain_info.json").read_text())
    print(f"| {name} | {info['config']['objective']} | {info['n_params']:,} | {info['steps']} × "
          f"{info['config']['batch_size']}×{info['config']['seq_len']} | {info['final_loss']} | {info['eval_loss']} |")
print()
print("| task | base (mode token) | exact match before | after | train loss first → last (completion tokens) |")
print("|---|---|---|---|---|")
for summary in sorted((runs / "ul2-lora").glob("*/summary.json")):
    name, task = summary.parent.name.rsplit("-", 1)
    d = json.loads(summary.read_text())
    losses = [r["loss"] for r in map(json.loads, (summary.parent / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    label = {"causal": "causal", "ul2-S": "UL2 ([S])", "ul2-none": "UL2 (no mode token)"}[name]
    print(f"| {task} | {label} | {d['before']['exact_match']:.3f} | {d['after']['exact_match']:.3f} | "
          f"{losses[0]:.3f} → {losses[-1]:.3f} |")
