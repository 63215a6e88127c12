"""Data mixture inference (arXiv 2407.16607) on tokenizers trained on known mixtures of lorakit's domains, and
on the real BPE tokenizers found offline.

    python benchmarks/mixture_inference/run.py --out benchmarks/mixture_inference/results.json

Training text and attacker samples are disjoint halves of each domain's documents (even / odd indices).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lorakit.assets import BASE_MODEL_PATH
from lorakit.pretrain import mixture_inference as mi
from lorakit.pretrain.corpus import take_chars
from lorakit.pretrain.domains import domain_documents
from lorakit.pretrain.tokenizer import train_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--n-mixtures", type=int, default=4)
parser.add_argument("--train-chars", type=int, default=300_000)
parser.add_argument("--vocab-size", type=int, default=1024)
parser.add_argument("--merges", type=int, default=500)
args = parser.parse_args()

names = ("code", "docstrings", "docs", "tasks")
docs = domain_documents(names, scale=0.1, seed=0)
train_pool = {n: d[::2] for n, d in docs.items()}
samples = {n: d[1::2] for n, d in docs.items()}
available = {n: sum(map(len, d)) for n, d in train_pool.items()}
results = {"controlled": [], "real": []}


rng = np.random.RandomState(0)
while len(results["controlled"]) < args.n_mixtures:
    shares = rng.dirichlet(np.ones(len(names)))
    if any(s * args.train_chars > available[n] for s, n in zip(shares, names)):
        continue
    train = {n: take_chars(train_pool[n], s * args.train_chars) for s, n in zip(shares, names)}
    n_bytes = {n: sum(len(t.encode()) for t in v) for n, v in train.items()}
    truth = {n: b / sum(n_bytes.values()) for n, b in n_bytes.items()}
    folder = Path(tempfile.mkdtemp())
    train_tokenizer([t for v in train.values() for t in v], args.vocab_size).save_pretrained(folder)
    start = time.perf_counter()
    result = mi.infer_from_texts(mi.load_bpe(folder), samples, args.merges)
    row = {"truth": truth, "inferred": result.byte_share, **mi.mixture_error(truth, result.byte_share),
           "seconds": round(time.perf_counter() - start, 1), "n_constraints": result.n_constraints,
           "n_rounds": result.n_rounds}
    results["controlled"].append(row)
    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

# the bundled base's tokenizer: pretrain_info says 3,000,536 chars of stdlib source + 3,008,236 of task text
info = json.loads((BASE_MODEL_PATH / "pretrain_info.json").read_text())["corpus"]
truth = {"code": info["stdlib_chars"] / (info["stdlib_chars"] + info["task_chars"]), "docstrings": 0.0, "docs": 0.0,
         "tasks": info["task_chars"] / (info["stdlib_chars"] + info["task_chars"])}
for merges in (args.merges, 2 * args.merges):
    start = time.perf_counter()
    result = mi.infer_from_texts(mi.load_bpe(BASE_MODEL_PATH), samples, merges)
    row = {"tokenizer": "lorakit bundled base (src/lorakit/assets/base_model)", "merges": merges,
           "truth_chars": truth, "inferred": result.byte_share, **mi.mixture_error(truth, result.byte_share),
           "seconds": round(time.perf_counter() - start, 1)}
    results["real"].append(row)
    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
