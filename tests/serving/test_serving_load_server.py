"""Load on the real server: many concurrent ``openai`` clients, many adapters through a few resident slots.

Every greedy output must equal the offline result for its adapter (``lorakit.serving.generate``, one mixed
batch per prompt); zero errors; the resident banks never exceed their caps; no KV block leaked at the end.
The CI version is small; the issue's full run (64 clients, 10 000 requests, 1000 adapters) is marked slow.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.hub import load_model_and_tokenizer
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.server import create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4 5", "Hello world, said"]


def bundled():
    return load_model_and_tokenizer()[0]


def _adapters(root, n, sh):
    """``n`` adapters: one saved the ordinary way, the rest the same layout with fresh random tensors and ranks
    4 or 8 (written directly: building a model per adapter would dominate the test)."""
    ranks = {4: sh.make_adapter(root / "_r4", seed=1, factory=bundled, r=4, target_modules=["q_proj", "v_proj"]),
             8: sh.make_adapter(root / "_r8", seed=2, factory=bundled, r=8, target_modules=["q_proj", "v_proj"])}
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        r = 4 if i % 2 else 8
        src = ranks[r]
        d = root / f"user{i:04d}"
        d.mkdir()
        (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        tensors = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in load_file(src / "adapter_model.safetensors").items()}
        save_file(tensors, d / "adapter_model.safetensors")
        names.append(d.name)
    for src in ranks.values():
        for f in src.iterdir():
            f.unlink()
        src.rmdir()
    return names


def _run_load(tmp_path, sh, *, clients, requests, adapters, max_loras, max_tokens=4):
    names = _adapters(tmp_path, adapters, sh)
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [tmp_path], max_loras=max_loras, max_cpu_loras=4 * max_loras)
    store.register_dir(tmp_path)
    engine = Engine(model, tok, store=store, kv_cache_bytes=16 << 20, max_batch=32)
    server = sh.LiveServer(create_app(engine, model_name="bundled"))
    rng = random.Random(0)
    jobs = [(rng.randrange(len(PROMPTS)), names[min(int(rng.paretovariate(1.0)) - 1, adapters - 1)]
             if rng.random() < 0.5 else rng.choice(names)) for _ in range(requests)]
    peak = {"resident": 0, "capacity": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["resident"] = max(peak["resident"], len(store.resident))
            peak["capacity"] = max([peak["capacity"]] + [b.capacity for b in list(store.registry.banks.values())])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)

    def ask(job):
        p, name = job
        r = client.completions.create(model=name, prompt=PROMPTS[p], max_tokens=max_tokens, temperature=0)
        return r.choices[0].text

    try:
        with cf.ThreadPoolExecutor(clients) as pool:
            got = list(pool.map(ask, jobs))
    finally:
        stop.set()
        watcher.join()
        server.stop()
    # offline: each prompt once, all used adapters as rows of one mixed batch
    reference, _ = load_model_and_tokenizer()
    used = sorted({n for _, n in jobs})
    load_adapters(reference, {n: tmp_path / n for n in used})
    expected = {}
    for p, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]] * len(used))
        out = bank_generate(reference, ids, used, max_new_tokens=max_tokens, do_sample=False)[:, ids.shape[1]:]
        for n, row in zip(used, out.tolist()):
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            expected[p, n] = tok.decode(row, skip_special_tokens=True)
    wrong = [(j, g) for j, g in zip(jobs, got) if g != expected[j]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} outputs differ, e.g. {wrong[:3]}"
    assert peak["resident"] <= max_loras and peak["capacity"] <= max_loras + 1  # + the zero slot
    assert engine.cache.used_blocks == 0 and not engine.running and not engine.waiting
    assert store.stats["evictions"] > 0
    return json.loads(json.dumps(dict(store.stats)))


def test_load_many_clients_many_adapters_small(tmp_path, sh):
    _run_load(tmp_path, sh, clients=16, requests=160, adapters=40, max_loras=8)


@pytest.mark.slow
def test_load_64_clients_10000_requests_1000_adapters(tmp_path, sh):
    _run_load(tmp_path, sh, clients=64, requests=10_000, adapters=1000, max_loras=64)
