"""GPU check for `lorakit serve --quantize nf4 --cuda-graphs` (refused on CUDA until this passes): greedy tokens of
the engine on the bitsandbytes 4-bit bundled base, eager vs the CUDA-graph static decode step, with an adapter row
and a base row in one batch. Prints True when they agree; then the refusal in cli.py (--cuda-graphs with
--quantize) can go.

Run from the repo root: PYTHONPATH=src:tests/serving:tests python scripts/device/serve_quantized_cuda.py [cuda|cpu]
"""
import sys
import tempfile
from pathlib import Path

from conftest import make_adapter  # tests/serving/conftest.py
from lorakit.hub import load_model_and_tokenizer
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
root = Path(tempfile.mkdtemp())
make_adapter(root / "a", seed=1, factory=lambda: load_model_and_tokenizer()[0], r=8, target_modules=["q_proj", "v_proj"])
outs = []
for graphs in (False, True):
    model, tokenizer = load_model_and_tokenizer(quantize="nf4", device=device)
    store = AdapterStore(model, [root])
    store.register_dir(root)
    engine = Engine(model, tokenizer, store=store, kv_cache_bytes=8 << 20, max_batch=4, cuda_graphs=graphs)
    ids = tokenizer("The quick brown fox")["input_ids"]
    requests = engine.generate([ids, ids], ["a", None], SamplingParams(max_tokens=16, temperature=0))
    outs.append([r.output_ids for r in requests])
print(outs[0] == outs[1], outs)
sys.exit(0 if outs[0] == outs[1] else 1)
