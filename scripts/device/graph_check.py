"""GPU check of the engine's CUDA-graph decode step (``Engine(cuda_graphs=True)``, ``serving/graphs.py``).

From the repository root, on a CUDA machine ($OUT = result folder; about 5 minutes on an H200):

    PYTHONPATH=src:tests python scripts/device/graph_check.py --out $OUT/graphs.json

Dry run on the CPU (tiny model, no capture: the static step runs eagerly; checks that the script works):

    PYTHONPATH=src:tests python scripts/device/graph_check.py --device cpu --out /tmp/graphs_cpu.json

Parts (the JSON is rewritten after each, so a time limit leaves the parts done):

1. ``equality``: greedy tokens of three engines on one workload (fp32; 12 adapters of ranks 8 and 16 in a store
   holding 8, so adapters are evicted and loaded while graphs exist; base rows; requests of different lengths
   joining and leaving): eager engine, static step run eagerly (``capture=False``), static step captured and
   replayed. Captured must equal static-eager exactly (same kernels); both should equal the eager engine.
2. ``steps``: milliseconds per decode step at steady state (B rows decoding, no prefill), eager vs graphs, with
   banked adapters (``lorakit``) and with one adapter merged (``merged``): the launch-bound cost graphs remove.
3. ``serve``: ``lorakit bench serve`` rows with systems lorakit, merged, lorakit_graphs, merged_graphs (S-LoRA
   workload; the ratio issue 13 asks for is lorakit_graphs/merged_graphs and lorakit_graphs/merged).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lorakit.bench.serving import bench_model, write_random_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore


def _model(args, dtype=torch.float32):
    if args.device == "cpu":
        model = bench_model(0, layers=2, hidden=64, heads=4, intermediate=128, vocab=256)
    else:
        model = bench_model(0)  # 8 layers x hidden 512, vocab 4096 (benchmarks/serve_cuda)
    return model.to(device=args.device, dtype=dtype)


def _adapters(root: Path, model) -> list[str]:
    """12 PEFT folders under ``root``: 6 of rank 8 and 6 of rank 16 (std 0.2 so that adapters change tokens)."""
    names = []
    for r, seed in ((8, 1), (16, 2)):
        tmp = root.parent / f"tmp_r{r}"
        dirs = write_random_adapters(model.cpu(), tmp, 6, r=r, alpha=2 * r, seed=seed, std=0.2)
        for i, d in enumerate(dirs.values()):
            name = f"r{r}_{i}"
            shutil.move(str(d), root / name)
            names.append(name)
    return names


def _engine(args, root: Path | None, graphs: bool, capture: bool | None = None, dtype=torch.float32,
            max_batch: int = 16, merge: Path | None = None):
    model = _model(args, dtype)
    if merge is not None:  # one adapter merged into the base weights (bench serve's "merged" system)
        from lorakit.core.model import merge_and_unload
        from lorakit.io.peft_format import load_adapter
        load_adapter(model, merge, "merged")
        model = merge_and_unload(model)
    store = None
    if root is not None:
        store = AdapterStore(model, [root], max_loras=8)
        store.register_dir(root)
    kv_mb = 16 if args.device == "cpu" else 512  # (64 rows x ~90 tokens decode without preemption)
    engine = Engine(model, store=store, kv_cache_bytes=kv_mb << 20, block_size=16, max_batch=max_batch,
                    cuda_graphs=graphs)
    if graphs and capture is not None:
        engine.graphs.capture = capture
    return engine


def equality(args, root: Path, names: list[str]) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 12 if args.device == "cpu" else 40
    vocab = 256 if args.device == "cpu" else 4096
    prompts = [torch.randint(3, vocab, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    specs = [None if i % 5 == 0 else names[(5 * i) % len(names)] for i in range(n)]  # more adapters than max_loras
    params = [SamplingParams(max_tokens=int(torch.randint(4, 48, (1,), generator=g)), ignore_eos=True)
              for _ in range(n)]
    out = {}
    for label, graphs, capture in (("eager", False, None), ("static_eager", True, False),
                                   ("graphs", True, args.device == "cuda")):
        engine = _engine(args, root, graphs, capture, max_batch=8)  # (8 running of 12 adapters, 8 resident: swaps)
        t = time.perf_counter()
        reqs = engine.generate(prompts, specs, params)
        out[label] = {"tokens": [r.output_ids for r in reqs], "errors": [r.error for r in reqs if r.error],
                      "seconds": time.perf_counter() - t,
                      "graph_stats": dict(engine.graphs.stats) if engine.graphs is not None else None,
                      "evictions": engine.store.stats["evictions"]}
        del engine
    eager, static, graphs = (out[k]["tokens"] for k in ("eager", "static_eager", "graphs"))
    result = {
        "rows": n, "graphs_equal_static_eager": graphs == static, "graphs_equal_eager": graphs == eager,
        "static_eager_equal_eager": static == eager,
        "rows_differing_graphs_vs_eager": sum(a != b for a, b in zip(graphs, eager)),
        "errors": {k: v["errors"] for k, v in out.items() if v["errors"]},
        "graph_stats": out["graphs"]["graph_stats"], "evictions": out["graphs"]["evictions"],
        "seconds": {k: v["seconds"] for k, v in out.items()},
    }
    return result


def steps(args, root: Path, names: list[str]) -> dict:
    """ms per decode step at steady state: ``batch`` rows decoding (prompts of 32 tokens), none finishing."""
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = []
    for batch in ((1, 8) if args.device == "cpu" else (1, 8, 32, 64)):
        row = {"batch": batch}
        for system in ("lorakit", "merged"):
            for graphs in (False, True):
                engine = _engine(args, root if system == "lorakit" else None, graphs, dtype=dtype, max_batch=batch,
                                 merge=root / names[0] if system == "merged" else None)
                specs = [names[i % 8] if system == "lorakit" else None for i in range(batch)]  # (8 = max_loras)
                if graphs:
                    if engine.store is not None:
                        engine.store.ensure_resident(specs[0])
                    engine.graphs.capture_all(32 + 200)
                for i in range(batch):
                    engine.submit(list(range(3, 35)), specs[i], SamplingParams(max_tokens=200, ignore_eos=True))
                for _ in range(4):  # admission + prefill + first decodes (and any remaining loads)
                    engine.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                count = 8 if args.device == "cpu" else 50
                t = time.perf_counter()
                for _ in range(count):
                    engine.step()
                ms = (time.perf_counter() - t) / count * 1e3  # each step reads its tokens back: synchronised
                label = f"{system}{'_graphs' if graphs else ''}"
                row[f"{label}_ms"] = ms
                row[f"{label}_running"] = engine.num_running  # (all `batch` rows decoding: no preemption)
                if graphs:
                    row[f"{label}_stats"] = dict(engine.graphs.stats)
                del engine
        row["lorakit_graphs/lorakit_speedup"] = row["lorakit_ms"] / row["lorakit_graphs_ms"]
        row["merged_graphs/merged_speedup"] = row["merged_ms"] / row["merged_graphs_ms"]
        row["lorakit_graphs/merged_graphs_throughput"] = row["merged_graphs_ms"] / row["lorakit_graphs_ms"]
        row["lorakit_graphs/merged_throughput"] = row["merged_ms"] / row["lorakit_graphs_ms"]
        row["lorakit/merged_throughput"] = row["merged_ms"] / row["lorakit_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"dtype": str(dtype), "rows": rows}


def serve(args) -> dict:
    from lorakit.bench.serve import ServeProfile, run_serve_bench, serve_markdown

    systems = ("lorakit", "merged", "lorakit_graphs", "merged_graphs")
    if args.device == "cpu":
        profile = ServeProfile(models=("bundled",), num_adapters=(4,), req_rate=4.0, duration_s=2.0,
                               output_range=(4, 8), input_range=(8, 24), max_loras=2, systems=systems, timeout_s=120.0)
    else:
        profile = ServeProfile(models=tuple(args.serve_models), num_adapters=tuple(args.serve_n), req_rate=60.0,
                               duration_s=4.0, max_batch=32, systems=systems, device="cuda", dtype="bfloat16",
                               timeout_s=240.0)
    result = run_serve_bench(profile)
    result["markdown"] = serve_markdown(result)
    print(result["markdown"], flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", nargs="+", default=["equality", "steps", "serve"], choices=["equality", "steps", "serve"])
    p.add_argument("--serve-models", nargs="+", default=["bundled", "random8x512"])
    p.add_argument("--serve-n", nargs="+", type=int, default=[100])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu for a dry run")
    if args.device == "cpu":
        torch.set_num_threads(1)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run: no capture)",
              "torch": torch.__version__, "parts": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        names = _adapters(root, _model(args))
        for part in args.parts:
            t = time.perf_counter()
            try:
                run = {"equality": lambda: equality(args, root, names), "steps": lambda: steps(args, root, names),
                       "serve": lambda: serve(args)}[part]
                result["parts"][part] = run()
            except Exception:  # noqa: BLE001  (one part failing must not lose the others' results)
                result["parts"][part] = {"error": traceback.format_exc()}
                ok = False
            result["parts"][part]["wall_s"] = time.perf_counter() - t
            args.out.write_text(json.dumps(result, indent=1, default=str))
            print(f"{part}: done in {time.perf_counter() - t:.1f}s", flush=True)
    eq = result["parts"].get("equality", {})
    if eq and not eq.get("error"):
        ok = ok and eq["graphs_equal_static_eager"] and eq["graphs_equal_eager"]
        ok = ok and "capture_error" not in (eq["graph_stats"] or {})
        if args.device == "cuda":
            ok = ok and eq["graph_stats"]["replays"] > 0
        print(json.dumps({k: eq[k] for k in ("graphs_equal_static_eager", "graphs_equal_eager",
                                              "rows_differing_graphs_vs_eager", "graph_stats")}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
