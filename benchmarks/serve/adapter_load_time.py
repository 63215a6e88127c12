"""Host time of one adapter load into a store's banks (bundled model, r=16 on all linears, host tier warm).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve/adapter_load_time.py

Prints the mean process CPU time per adapter for 64 loads into empty banks ("fill") and for 128 loads that each
evict the least recently used adapter ("steady"), max_loras=64 as in `lorakit bench serve`.
"""

import tempfile
import time
from pathlib import Path

import torch

from lorakit.bench import serve as S
from lorakit.serving.store import AdapterStore

torch.set_num_threads(1)
root = Path(tempfile.mkdtemp()) / "adapters"
dirs = S.write_random_adapters(S._base("bundled", 0), root, 192, r=16, alpha=32, seed=0)
store = AdapterStore(S._base("bundled", 0), [root], max_loras=64, max_cpu_loras=256)
store.register_dir(root)
names = [d.name for d in dirs.values()]
for n in names:
    store._read_host(n)  # host tier warm: what is timed is the copy into the banks and its bookkeeping
t0 = time.process_time()
for n in names[:64]:
    store.ensure_resident(n)
t1 = time.process_time()
for n in names[64:]:
    store.ensure_resident(n)
t2 = time.process_time()
print(f"fill: {(t1 - t0) / 64 * 1e3:.2f} ms/adapter; steady (evict + load): {(t2 - t1) / 128 * 1e3:.2f} ms/adapter")
