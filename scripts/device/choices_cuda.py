"""GPU check: OpenAI `n` choices sharing one prefill (Engine.submit_choices) on the CUDA-graph static decode step
give the tokens of separate eager requests with seeds seed + i, and leave no KV block held.

Run from the repo root: PYTHONPATH=src:tests/serving:tests python scripts/device/choices_cuda.py [cuda|cpu]
(serve_check.sh graphs runs it). Seeded sampling: on CUDA a tiny graph-vs-eager logit difference can change a
token, so read a DIFF with that in mind (greedy rows of graph_check.py are the strict check)."""
import sys, tempfile
from pathlib import Path
import torch
import conftest as sh
from lk_models import tiny_llama
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
root = Path(tempfile.mkdtemp())
dirs = {f"a{i}": sh.make_adapter(root / f"a{i}", seed=10 + i, r=2 + 3 * i) for i in range(3)}
model = tiny_llama().to(dev)
load_adapters(model, dirs)
bad = 0
for plen in (1, 4, 7):
    for spec in ("a1", None, {"a0": 0.5, "a2": 0.5}):
        for blocks in (64, 8):
            prompt = list(range(5, 5 + plen))
            params = [SamplingParams(max_tokens=8, temperature=1.0, seed=30 + i, ignore_eos=True) for i in range(4)]
            out = {}
            for graphs, shared in ((True, True), (False, False)):
                e = Engine(model, kv_cache_bytes=sh.kv_budget(model, blocks), block_size=4, max_batch=4,
                           cuda_graphs=graphs)
                reqs = e.submit_choices(prompt, spec, params) if shared else [e.submit(prompt, spec, p) for p in params]
                while not all(r.done.is_set() for r in reqs):
                    e.step()
                assert e.cache.used_blocks == 0
                out[graphs] = ([r.output_ids for r in reqs], e.stats["forked"], e.stats["preemptions"])
            same = out[True][0] == out[False][0]
            bad += not same
            print(plen, spec, blocks, "same" if same else "DIFF", "forked", out[True][1], "preempt", out[True][2])
print("FAILURES", bad)
sys.exit(1 if bad else 0)
