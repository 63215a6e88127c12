"""Final RegMix comparison at proxy scale (reduced; see README): natural, uniform and the RegMix mixture,
each trained for ``--steps`` on the same tokenizer and scored on the same held-out blocks per domain.

    python benchmarks/regmix/compare.py --sweep SWEEP_DIR --out compare.json [--steps 300] [--seeds 0]

The RegMix mixture is read from SWEEP_DIR/regmix.json (``lorakit regmix --out SWEEP_DIR``); the script waits
for it after training the other two, so it can start while the sweep is still running.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from lorakit.pretrain.domains import prepare_domain_data, uniform_weights
from lorakit.pretrain.regmix import RegMixConfig, load_regmix_mixture, train_proxy

parser = argparse.ArgumentParser()
parser.add_argument("--sweep", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--seeds", default="0")
args = parser.parse_args()
torch.set_num_threads(1)

base = RegMixConfig()  # the sweep's data settings, so tokenizer and held-out blocks are the proxies' own
config = replace(base, steps=args.steps)
data = prepare_domain_data(config.domains, config.seq_len, config.vocab_size, config.eval_blocks,
                           config.domain_scale, config.seed, None, config.seq_len, lambda s: print(s, flush=True))
mixtures = {"natural": data.natural(), "uniform": uniform_weights(config.domains)}
results = json.loads(args.out.read_text()) if args.out.exists() else {}


def run(name: str, weights: dict) -> None:
    for seed in (int(s) for s in args.seeds.split(",")):
        key = f"{name}/seed{seed}"
        if key in results:
            continue
        start = time.perf_counter()
        losses = train_proxy(data, weights, config, 10_000 + seed)
        results[key] = {"weights": weights, "losses": losses, "mean": sum(losses.values()) / len(losses),
                        "seconds": round(time.perf_counter() - start, 1)}
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(key, json.dumps(results[key]), flush=True)


for name, weights in mixtures.items():
    run(name, weights)
while not (args.sweep / "regmix.json").exists():
    time.sleep(20)
run("regmix", load_regmix_mixture(args.sweep))
