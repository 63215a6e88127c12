"""The benchmarks/ul2 tables from the two bases and the LoRA runs on them.

    python benchmarks/ul2/table.py runs                                   # run 1: pretrain-small/{pre,ul2}, ul2-lora/*
    python benchmarks/ul2/table.py runs --pretrain ul2-long --causal causal --lora ul2-long-lora   # run 2
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("runs", type=Path, nargs="?", default=Path("runs"))
parser.add_argument("--pretrain", default="pretrain-small", help="folder under RUNS with the two bases")
parser.add_argument("--causal", default="pre", help="the causal base's folder name (the UL2 one is 'ul2')")
parser.add_argument("--lora", default="ul2-lora", help="folder under RUNS with the LoRA runs (NAME-TASK/)")
args = parser.parse_args()
runs = args.runs

print("| base | objective | params | pretraining steps × tokens | final train loss (its objective) | held-out next-token loss | CPU s/step |")
print("|---|---|---|---|---|---|---|")
for name in (args.causal, "ul2"):
    path = runs / args.pretrain / name / "pretrain_info.json"
    if not path.exists():
        print(f"| {name} | (not finished) | | | | | |")
        continue
    info = json.loads(path.read_text())
    print(f"| {name} | {info['config']['objective']} | {info['n_params']:,} | {info['steps']} × "
          f"{info['config']['batch_size']}×{info['config']['seq_len']} | {info['final_loss']} | {info['eval_loss']} | "
          f"{info.get('train_cpu_s', info['train_time_s']) / info['steps']:.3f} |")
print()
print("| task | base (mode token) | exact match before | after | train loss first → last (completion tokens) |")
print("|---|---|---|---|---|")
for summary in sorted((runs / args.lora).glob("*/summary.json")):
    name, task = summary.parent.name.rsplit("-", 1)
    d = json.loads(summary.read_text())
    losses = [r["loss"] for r in map(json.loads, (summary.parent / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    label = {"causal": "causal", "ul2-S": "UL2 ([S])", "ul2-none": "UL2 (no mode token)"}[name]
    print(f"| {task} | {label} | {d['before']['exact_match']:.3f} | {d['after']['exact_match']:.3f} | "
          f"{losses[0]:.3f} → {losses[-1]:.3f} |")
