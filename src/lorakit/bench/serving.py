"""Serving benchmark: mixed-adapter batches through the banks vs the base model and vs PEFT's ``adapter_names``.

``run_serving_bench(...)`` returns a plain dict (for ``lorakit bench perf``); ``python -m lorakit.bench.serving``
prints it as JSON. Everything runs side by side in one process with ``torch.inference_mode()``, a fixed
thread count and interleaved repeats (round robin over the variants, so machine noise hits all of them alike);
reported are min and median seconds and the ratios of the minima.

Workload (defaults): a Llama-style model from random weights (8 layers, hidden 512, 8 heads, intermediate 1376,
vocab 4096), LoRA r=16 on all seven linear layers, 256 rows x 16 tokens, row i uses adapter i mod N.
Adapters are random and written in PEFT's layout straight with safetensors.

Threads default to 1: on a small shared machine OpenMP fan-out over 2 threads stalls whenever a core is
taken by another process (a 5 MB reduction went from 0.08 ms to 25 ms), which swamps what is measured.
With N >= batch the banked run is timed twice: rows in adapter order (bank slots contiguous and sorted, so
the SGMV path needs no weight copies) and rows shuffled (plain per-row gather, BGMV) — the honest general case.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..cli_parser import CommandParser
from ..core.errors import ConfigError
from ..io.files import atomic_write_bytes
from .perf import EXTRA_ROWS

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_model(seed: int = 0, *, layers: int = 8, hidden: int = 512, heads: int = 8, intermediate: int = 1376,
                vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR:
            out[name] = (m.in_features, m.out_features)
    return out


def write_random_adapters(model, root: Path, n: int, *, r: int = 16, alpha: float = 32, seed: int = 0,
                          std: float = 0.02) -> dict[str, Path]:
    """``n`` random LoRA folders in PEFT's layout (adapter_config.json + adapter_model.safetensors).

    To keep creation fast, adapter i is a shared random draw scaled by its own factor plus a small per-adapter
    random slice — distinct weights per adapter, realistic file sizes. ConfigError, before any
    file is written, when their tensors would not fit in the free space of ``root``'s file system.
    """
    shapes = _linear_shapes(model)
    need = n * sum((i + o) * r for i, o in shapes.values()) * 4  # fp32 lora_A (r, in) + lora_B (out, r) per layer
    where = Path(root)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"{n:,} random adapters of rank {r} need {need / 1e9:.3g} GB, but {where} has "
                          f"{free / 1e9:.3g} GB free; use fewer adapters or a lower rank")
    g = torch.Generator().manual_seed(seed)
    pool = {k: (torch.randn(r, i, generator=g) * std, torch.randn(o, r, generator=g) * std) for k, (i, o) in shapes.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": LINEAR, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "base_model_name_or_path": None}
    dirs = {}
    for a in range(n):
        d = root / f"adapter_{a:05d}"
        d.mkdir(parents=True, exist_ok=True)
        factor = 1.0 + 0.5 * torch.rand((), generator=g).item()
        tensors = {}
        for k, (A, B) in pool.items():
            bump = torch.randn(1, generator=g).item() * std
            tensors[f"base_model.model.{k}.lora_A.weight"] = (A * factor).contiguous()
            tensors[f"base_model.model.{k}.lora_B.weight"] = (B * factor + bump).contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_bytes(d / "adapter_config.json", json.dumps(config).encode())
        dirs[f"a{a}"] = d
    return dirs


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int, caps: dict[str, int] | None = None) -> dict:
    """Wall seconds per call (CUDA work is synchronised before the clock is read)."""
    caps = caps or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up (and Triton compilation)
        f()
    for i in range(repeats):
        for k, f in fns.items():
            if i >= caps.get(k, repeats):
                continue
            _sync()
            t = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "repeats": len(v)} for k, v in times.items()}


def run_serving_bench(ns: tuple[int, ...] = (1, 8, 64, 256), *, batch: int = 256, tokens: int = 16, r: int = 16,
                      threads: int = 1, repeats: int = 5, peft: bool = True, peft_max_n: int = 256,
                      load_n: int = 1000, seed: int = 0, workdir: str | None = None,
                      log: Callable[[str], None] | None = None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Mixed-batch forward time vs base and vs PEFT for each N in ``ns``, and the time to load ``load_n`` adapters.

    Returns ``{"config": ..., "forward": {N: {...}}, "load": {...}}`` with ratios
    ``bank_over_base`` (goal <= 1.10) and ``peft_over_bank`` (goal >= 1.5). On a device with a registered bank
    kernel (CUDA + Triton) the banked forward is also timed with the kernel removed (``bank_torch``), side by side.
    """
    from ..serving import bank as bank_mod
    from ..serving.multi import load_adapters

    def bench_model_on(s):
        return bench_model(s).to(device=device, dtype=dtype)

    log = log or (lambda s: None)
    torch.set_num_threads(threads)
    kernel = bank_mod._KERNELS.get(torch.device(device).type)
    result: dict[str, Any] = {"config": dict(ns=list(ns), batch=batch, tokens=tokens, r=r, threads=threads,
                                             repeats=repeats, load_n=load_n, torch=torch.__version__,
                                             device=device, dtype=str(dtype).replace("torch.", ""),
                                             kernel=getattr(kernel, "__module__", None)),
                              "forward": {}, "load": {}}
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    root = Path(tmp.name)
    try:
        base = bench_model_on(seed)
        n_files = max(max(ns), load_n)
        t = time.perf_counter()
        dirs = write_random_adapters(base, root, n_files, r=r, seed=seed)
        result["load"]["write_s"] = time.perf_counter() - t
        log(f"wrote {n_files} adapters in {result['load']['write_s']:.1f}s")

        if load_n:
            served = bench_model_on(seed)
            t = time.perf_counter()
            reg = load_adapters(served, dict(list(dirs.items())[:load_n]))
            result["load"].update(n=load_n, seconds=time.perf_counter() - t, bank_bytes=reg.memory_bytes())
            log(f"loaded {load_n} adapters in {result['load']['seconds']:.1f}s")
            del served, reg
            gc.collect()
        if peft:
            result["load"]["peft_check_max_abs_diff"] = _check_against_peft(dirs["a0"], seed)

        ids = torch.randint(0, base.config.vocab_size, (batch, tokens),
                            generator=torch.Generator().manual_seed(seed)).to(device)
        for n in ns:
            names = [f"a{i}" for i in range(n)]
            # Row i uses adapter i mod N (every adapter used when N <= batch; spread over the bank when N > batch).
            rows = [names[i % n] if n <= batch else names[i * n // batch] for i in range(batch)]
            shuffled = [rows[j] for j in torch.randperm(batch, generator=torch.Generator().manual_seed(seed))]
            served = bench_model_on(seed)
            reg = load_adapters(served, {k: dirs[k] for k in names})
            fns: dict[str, Callable[[], Any]] = {"base": lambda: base(input_ids=ids)}

            def banked(served=served, reg=reg, rows=rows):
                with reg.routing(rows):
                    return served(input_ids=ids)

            fns["bank"] = banked
            if kernel is not None:  # the same banks through the torch path, the kernel removed for the call

                def banked_torch(served=served, reg=reg, rows=rows):
                    bank_mod.register_kernel(torch.device(device).type, None)
                    try:
                        return banked(served, reg, rows)
                    finally:
                        bank_mod.register_kernel(torch.device(device).type, kernel)

                fns["bank_torch"] = banked_torch
            if n >= batch:  # rows in adapter order hit the gather-free SGMV path; shuffled rows show plain BGMV
                fns["bank_shuffled"] = lambda served=served, reg=reg, rows=shuffled: banked(served, reg, rows)
            pm = None
            if peft and n <= peft_max_n:
                t = time.perf_counter()
                pm = _peft_model(seed, [dirs[k] for k in names], names).to(device=device, dtype=dtype)
                log(f"N={n}: PEFT loaded in {time.perf_counter() - t:.1f}s")
                fns["peft"] = lambda pm=pm, rows=rows: pm(input_ids=ids, adapter_names=rows)
            with torch.inference_mode():
                out_bank = banked()
                if pm is not None:
                    diff = (out_bank.logits - pm(input_ids=ids, adapter_names=rows).logits).abs().max().item()
                times = _time_round_robin(fns, repeats)
            row = {k: v for k, v in times.items()}
            row["bank_over_base"] = times["bank"]["min_s"] / times["base"]["min_s"]
            if "bank_shuffled" in times:
                row["bank_shuffled_over_base"] = times["bank_shuffled"]["min_s"] / times["base"]["min_s"]
            if "bank_torch" in times:
                row["bank_torch_over_bank"] = times["bank_torch"]["min_s"] / times["bank"]["min_s"]
                with torch.inference_mode():
                    row["max_abs_diff_kernel_vs_torch"] = (out_bank.logits.float()
                                                           - banked_torch().logits.float()).abs().max().item()
            if pm is not None:
                row["peft_over_bank"] = times["peft"]["min_s"] / times["bank"]["min_s"]
                if "bank_shuffled" in times:
                    row["peft_over_bank_shuffled"] = times["peft"]["min_s"] / times["bank_shuffled"]["min_s"]
                row["peft_over_base"] = times["peft"]["min_s"] / times["base"]["min_s"]
                row["max_abs_diff_vs_peft"] = diff
            result["forward"][n] = row
            log(f"N={n}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else round(v["min_s"], 3))
                                         for k, v in row.items()}))
            del served, reg, pm, fns
            gc.collect()
    finally:
        tmp.cleanup()
    return result


def _noop_kernel(x, A, B, slots, weights, r_used, *, ranks=None, out=None):
    """A bank kernel that computes nothing: what is left of a banked forward is the host work around the kernel."""
    return out if out is not None else x.new_zeros(x.shape[0], x.shape[1], B.shape[2])


def run_host_overhead(*, n: int = 16, batch: int = 64, tokens: int = 1, layers: int = 8, hidden: int = 16,
                      r: int = 4, repeats: int = 200, rounds: int = 5, threads: int = 1, seed: int = 0,
                      profile: int = 0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Host (Python + dispatch) time the serving banks add per bank per forward, measured on the CPU.

    The model is a Llama from random weights so small (hidden ``hidden``, intermediate 2·hidden, vocab 64) that
    its arithmetic is negligible: what a forward costs is host work, as on a GPU where a small model is bound by
    launches and Python. ``n`` adapters of rank ``r`` on all seven linear layers (``layers`` × 7 banks), a batch of
    ``batch`` rows × ``tokens`` tokens (default: one decode step), row i on adapter i mod n. Variants, timed
    interleaved (``rounds`` rounds of ``repeats`` calls each, round robin; the minimum per-call mean is kept):

    - ``base``: the same model without adapters.
    - ``bank_kernel``: the banks with a no-op kernel registered for "cpu" (``register_kernel``), so they take the
      path a fused CUDA kernel takes (no host read of the slots, the kernel gets every batch); a new routing block
      each forward, as the engine does.
    - ``bank_kernel_reuse``: the same with one routing block around all forwards (the banks' plan cache hits).
    - ``bank_torch``: the banks through the torch path (real gathers and bmm), a new routing block each forward.
    - ``layer_calls`` (per bank only): the adapted layers with hidden-size inputs called on their own, no model
      around them (a new routing block per pass, no-op kernel), minus their base layers called alone — the least
      noisy view of the per-bank cost.

    Reported: ``us_per_forward`` for each and ``us_per_bank`` = (variant − base) / number of banks, in wall time
    and in process CPU time (``cpu_*``: steadier on a shared machine, where wall time includes waiting). With
    ``profile`` > 0, the ``profile`` functions with the largest own time in ``bank_kernel`` (cProfile).
    """
    from ..serving import bank as bank_mod
    from ..serving.multi import load_adapters

    log = log or (lambda s: None)
    torch.set_num_threads(threads)
    shape = dict(layers=layers, hidden=hidden, heads=2, intermediate=2 * hidden, vocab=64)
    base = bench_model(seed, **shape)
    served = bench_model(seed, **shape)
    with tempfile.TemporaryDirectory() as tmp:
        reg = load_adapters(served, write_random_adapters(base, Path(tmp), n, r=r, seed=seed))
    banks = len(reg.banks)
    rows = [f"a{i % n}" for i in range(batch)]
    ids = torch.randint(0, 64, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    previous = bank_mod._KERNELS.get("cpu")

    def with_kernel(fn):
        def call():
            bank_mod.register_kernel("cpu", _noop_kernel)
            try:
                return fn()
            finally:
                bank_mod.register_kernel("cpu", previous)
        return call

    def banked():
        with reg.routing(rows):
            return served(input_ids=ids)

    def reused():
        with reg.routing(rows):
            for _ in range(repeats):
                served(input_ids=ids)

    # The same per bank with no model around it: every adapted layer that takes hidden-size inputs called once
    # per pass (a new routing block per pass, as a forward), against calling their base layers.
    from ..core.layer import AdapterLayer
    from ..core.routing import routing

    adapted = [m for m in served.modules() if isinstance(m, AdapterLayer) and m.base_layer.in_features == hidden]
    x = torch.randn(batch, tokens, hidden, generator=torch.Generator().manual_seed(seed))
    adapter_ids = reg.route(rows)[0]

    def layer_calls():
        for _ in range(repeats):
            with routing(adapter_ids=adapter_ids.clone()):
                for layer in adapted:
                    layer(x)

    def base_calls():
        for _ in range(repeats):
            for layer in adapted:
                layer.base_layer(x)

    loops = {"base": lambda: [base(input_ids=ids) for _ in range(repeats)],
             "bank_kernel": with_kernel(lambda: [banked() for _ in range(repeats)]),
             "bank_kernel_reuse": with_kernel(reused),
             "bank_torch": lambda: [banked() for _ in range(repeats)],
             "layer_base": base_calls, "layer_bank_kernel": with_kernel(layer_calls)}
    best = {k: float("inf") for k in loops}
    best_cpu = dict(best)
    with torch.inference_mode():
        for f in loops.values():  # warm-up
            f()
        for i in range(rounds):
            for k, f in loops.items():
                t, c = time.perf_counter(), time.process_time()
                f()
                best_cpu[k] = min(best_cpu[k], (time.process_time() - c) / repeats)
                best[k] = min(best[k], (time.perf_counter() - t) / repeats)
            log(f"round {i + 1}/{rounds}: " + ", ".join(f"{k} {v * 1e6:.0f} us (cpu {best_cpu[k] * 1e6:.0f})"
                                                          for k, v in best.items()))
        result: dict[str, Any] = {
            "config": dict(n=n, batch=batch, tokens=tokens, layers=layers, hidden=hidden, r=r, banks=banks,
                           repeats=repeats, rounds=rounds, threads=threads, torch=torch.__version__),
        }
        for prefix, b in (("", best), ("cpu_", best_cpu)):  # cpu_: process CPU time (steadier on a shared machine)
            forward = {k: v * 1e6 for k, v in b.items() if not k.startswith("layer_")}
            result[prefix + "us_per_forward"] = forward
            result[prefix + "us_per_bank"] = {k: (v - forward["base"]) / banks for k, v in forward.items() if k != "base"}
            result[prefix + "us_per_bank"]["layer_calls"] = ((b["layer_bank_kernel"] - b["layer_base"]) * 1e6
                                                             / len(adapted))
        result["config"]["layer_calls"] = len(adapted)
        if profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            with_kernel(lambda: [banked() for _ in range(repeats)])()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile)
            result["profile"] = text.getvalue()
    return result


def _peft_model(seed: int, dirs: list[Path], names: list[str]):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(bench_model(seed), str(dirs[0]), adapter_name=names[0])
    for d, name in zip(dirs[1:], names[1:]):
        pm.load_adapter(str(d), adapter_name=name)
    return pm.eval()


def _check_against_peft(directory: Path, seed: int) -> float:
    """One generated adapter gives the same logits through PEFT and through lorakit's banks (sanity of the files)."""
    from ..serving.multi import load_adapters

    ids = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        pm = _peft_model(seed, [directory], ["x"])
        expected = pm(input_ids=ids).logits
        served = bench_model(seed)
        reg = load_adapters(served, {"x": directory})
        with reg.routing(["x", "x"]):
            got = served(input_ids=ids).logits
    return (got - expected).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="python -m lorakit.bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed calls per variant (default 5; --host-overhead: 200 per round)")
    p.add_argument("--load-n", type=int, default=1000)
    p.add_argument("--peft-max-n", type=int, default=256)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, help="rows (default 256; --host-overhead: 64)")
    p.add_argument("--tokens", type=int, help="tokens per row (default 16; --host-overhead: 1, a decode step)")
    p.add_argument("--host-overhead", action="store_true",
                   help="measure the banks' host time per bank per forward on a tiny model (see run_host_overhead)")
    p.add_argument("--n", type=int, default=16, help="--host-overhead: adapters")
    p.add_argument("--hidden", type=int, default=16, help="--host-overhead: hidden size")
    p.add_argument("--rounds", type=int, default=5, help="--host-overhead: interleaved rounds")
    p.add_argument("--profile", type=int, default=0, help="--host-overhead: print the top K functions (cProfile)")
    args = p.parse_args(argv)
    if args.host_overhead:
        res = run_host_overhead(n=args.n, batch=args.batch or 64, tokens=args.tokens or 1, hidden=args.hidden,
                                repeats=args.repeats or 200, rounds=args.rounds, threads=args.threads, profile=args.profile,
                                log=lambda s: print(s, flush=True))
        profile = res.pop("profile", None)
        text = json.dumps(res, indent=2)
        print(text)
        if profile:
            print(profile)
        if args.out:
            atomic_write_bytes(args.out, text.encode())
        return
    res = run_serving_bench(tuple(args.ns), threads=args.threads, repeats=args.repeats or 5, load_n=args.load_n,
                            peft=not args.no_peft, peft_max_n=args.peft_max_n, log=lambda s: print(s, flush=True),
                            device=args.device, dtype=getattr(torch, args.dtype), batch=args.batch or 256,
                            tokens=args.tokens or 16)
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())


def serving_perf_rows(profile, device) -> list[dict]:
    """``lorakit bench perf`` rows: mixed-adapter batches (one adapter per row) and bulk loading."""
    quick = profile.models == ("llama-tiny",)
    ns = (1, 2) if quick else (1, 8, 64, 256, 1024)
    result = run_serving_bench(ns, batch=8 if quick else 256, tokens=4 if quick else 16, repeats=1 if quick else 5,
                               load_n=4 if quick else 1000, peft_max_n=2 if quick else 256, threads=torch.get_num_threads())
    rows = []
    for n, t in result["forward"].items():

        def ratio(a, b):
            return {"min": t[a]["min_s"] / t[b]["min_s"], "median": t[a]["median_s"] / t[b]["median_s"]}
        row = {"row": f"mixed batch, N={n} distinct adapters", "model": "llama-8x512",
               "lorakit/base": ratio("bank", "base")}
        if "peft" in t:
            row["peft/base"] = ratio("peft", "base")
            row["lorakit/peft"] = ratio("bank", "peft")
        if "bank_shuffled" in t:
            row["note"] = f"rows shuffled: lorakit/base {t['bank_shuffled']['min_s'] / t['base']['min_s']:.3f}"
        rows.append(row)
    load = result["load"]
    if "seconds" in load:
        rows.append({"row": f"load {load['n']} PEFT adapters into banks", "model": "llama-8x512",
                     "note": f"{load['seconds']:.1f} s total ({load['bank_bytes'] / 2**30:.2f} GiB of banks)"})
    return rows


EXTRA_ROWS.setdefault("mixed", serving_perf_rows)

if __name__ == "__main__":
    main()
