"""``lorakit bench serve``: S-LoRA's synthetic serving workload replayed against lorakit's engine and PEFT servers.

Workload (S-LoRA, Sheng et al., arXiv:2311.03285; ``benchmarks/trace.py`` ``generate_requests``, re-implemented):
adapter of request i = floor(N · X_i) with X_i ~ numpy ``power(alpha)`` (alpha = 1: uniform popularity, smaller:
skewed to low indices); inter-arrival times ~ Gamma(shape 1/cv², scale cv²/rate) (cv = 1: Poisson); input and
output lengths uniform in their ranges; one numpy seed for all of it.

Clock: requests are replayed on a virtual clock = this process's CPU time + the idle time skipped while waiting
for the next arrival. On a shared machine wall-clock time mostly measures the neighbours (the same run went
from 1.8 to 3.8 req/s between two identical passes); CPU time does not, and every system runs single-threaded
in this process, so the clock advances only with its own work.

Systems, side by side on the same model, adapters and trace:

- ``lorakit``: the continuous-batching engine (paged KV cache, banks, adapter tiers) with N adapters.
- ``merged`` (a): the same engine, every request on one adapter merged into the base weights.
- ``peft_mixed`` (b): a server loop over the real ``peft`` package at its best: static batches of the arrived
  requests (HF ``generate`` cannot add rows mid-generation), one ``adapter_names`` mixed batch each.
- ``peft_swap`` (c): S-LoRA's PEFT baseline: each batch takes requests of one adapter (the oldest request's)
  and swaps that adapter's weights in from disk (``peft.utils.hotswap.hotswap_adapter``).
- ``lorakit_unshared`` (opt-in; the default with ``choices`` > 1): ``lorakit`` with each of a request's ``choices``
  (OpenAI's ``n``) submitted as a request of its own, so each prefills the prompt itself; ``lorakit`` submits them
  with ``Engine.submit_choices``, which prefills the prompt once and forks its KV blocks. Choice i of request j
  samples (temperature 1) with seed ``j * choices + i`` in both, so both generate the same tokens.
- ``lorakit_graphs`` / ``merged_graphs`` (opt-in, not in the default list): ``lorakit`` / ``merged`` with
  ``Engine(cuda_graphs=True)``: static-shape decode steps, captured in CUDA graphs on a GPU (``serving/graphs.py``;
  on the CPU the static step runs eagerly, so these rows measure only its padding cost there).

Reported per system: throughput (requests/s, output tokens/s), time to first token and latency (mean, p50,
p90, p99), SLO attainment (first token within ``slo_s``; S-LoRA's metric uses 6 s), adapter and KV memory
(bytes the system holds for adapters and caches), adapter load time (CPU seconds), prompt tokens the engine
systems prefilled (``prefill_tokens``: with ``choices`` > 1, shared prefills count once), the run's wall seconds
(``wall_s``, beside the clock's makespan), and ratios between systems.
PEFT runs are limited to ``peft_max_n`` adapters: loading thousands of adapters as PEFT modules is itself the
bottleneck on CPU (recorded as skipped, not estimated).
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import save_figure
from .serving import bench_model, write_random_adapters


@dataclass
class TraceRequest:
    index: int
    adapter: int
    input_len: int
    output_len: int
    arrival_s: float


def generate_requests(num_adapters: int, alpha: float, req_rate: float, cv: float, duration_s: float,
                      input_range: tuple[int, int], output_range: tuple[int, int], seed: int = 42) -> list[TraceRequest]:
    """S-LoRA's synthetic trace: ``int(req_rate * duration)`` requests (see the module docstring). ``seed``: any
    int in 0..2**63 - 1 (``--seeds``); numpy's RandomState takes 0..2**32 - 1 as an int, so a larger seed seeds it
    with its two 32-bit words (the seeds below keep the trace S-LoRA's int seeding draws)."""
    rng = np.random.RandomState(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    total = int(req_rate * duration_s)
    adapters = np.minimum((rng.power(alpha, total) * num_adapters).astype(int), num_adapters - 1)
    inputs = rng.randint(input_range[0], input_range[1], total)
    outputs = rng.randint(output_range[0], output_range[1], total)
    gaps = rng.gamma(1.0 / (cv * cv), cv * cv / req_rate, total)
    arrivals = np.cumsum(gaps)
    return [TraceRequest(i, int(adapters[i]), int(inputs[i]), int(outputs[i]), float(arrivals[i])) for i in range(total)]


@dataclass
class ServeProfile:
    models: tuple[str, ...] = ("bundled", "random8x512")
    num_adapters: tuple[int, ...] = (5, 100, 1000)
    alpha: float = 1.0
    req_rate: float = 6.0
    cv: float = 1.0
    duration_s: float = 4.0
    input_range: tuple[int, int] = (8, 64)
    output_range: tuple[int, int] = (8, 32)
    r: int = 16
    max_batch: int = 16
    max_loras: int = 64
    peft_max_n: int = 100
    slo_s: float = 6.0
    seed: int = 42
    systems: tuple[str, ...] = ("lorakit", "merged", "peft_mixed", "peft_swap")
    timeout_s: float = 300.0
    device: str = "cpu"  # "cuda": models, banks and KV cache on the GPU, wall-clock timing (see _Clock)
    dtype: str = "float32"
    kv_cache_mb: int = 64
    choices: int = 1  # OpenAI's n: choices per request (> 1: engine systems only)

    def __post_init__(self) -> None:
        """ConfigError (``field``: the setting) for a profile that cannot run: no adapters, no arrivals, ..."""
        from ..core.errors import FIELD, ConfigError, check_names

        for name in ("num_adapters", "max_batch", "max_loras", "r", "kv_cache_mb", "choices"):
            values = getattr(self, name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{FIELD} must be a positive integer, got {v!r}", field=name)
        for name in ("req_rate", "duration_s", "cv", "slo_s", "timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{FIELD} must be > 0 and finite, got {getattr(self, name)!r}", field=name)
        total = int(self.req_rate * self.duration_s)  # the trace's length (generate_requests)
        if not 1 <= total <= MAX_TRACE:
            raise ConfigError(f"the trace's length, req_rate x {FIELD} = {self.req_rate:g} x {self.duration_s:g} = "
                              f"{total} requests, must be 1 to {MAX_TRACE:,} (it is built in memory before the run)",
                              field="duration_s")
        if self.peft_max_n < 0:
            raise ConfigError(f"{FIELD} must be >= 0, got {self.peft_max_n}", field="peft_max_n")
        for name in ("input_range", "output_range"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ConfigError(f"{FIELD} must be (low, high) with 1 <= low <= high, got {(low, high)}", field=name)
        check_names(self.models, MODELS, "bench serve model")
        check_names(self.systems, SYSTEMS, "bench serve system")
        peft = [s for s in self.systems if s.startswith("peft")]
        if self.choices > 1 and peft:
            raise ConfigError(f"{FIELD}={self.choices} runs the engine systems only (the PEFT servers take one choice "
                              f"per request); drop {', '.join(peft)} from systems (e.g. lorakit lorakit_unshared)",
                              field="choices")
        for name in ("models", "num_adapters", "systems"):
            if not getattr(self, name):
                raise ConfigError(f"bench serve needs at least one model, adapter count and system: {FIELD} is empty",
                                  field=name)


MODELS = ("bundled", "random8x512")
MAX_TRACE = 1_000_000  # requests in one trace at most (S-LoRA's traces are thousands)
SYSTEMS = ("lorakit", "merged", "peft_mixed", "peft_swap", "lorakit_graphs", "merged_graphs", "lorakit_unshared")
CHOICE_SYSTEMS = ("lorakit", "lorakit_unshared")  # the default systems when a request asks for choices > 1
# (name, numerator, denominator): reported when both systems ran
RATIOS = tuple((f"{a}/{b}", a, b) for a, b in (
    ("lorakit", "merged"), ("lorakit", "peft_mixed"), ("lorakit", "peft_swap"), ("lorakit_graphs", "merged_graphs"),
    ("lorakit_graphs", "merged"), ("lorakit_graphs", "lorakit"), ("merged_graphs", "merged"),
    ("lorakit", "lorakit_unshared")))

QUICK = ServeProfile(models=("bundled",), num_adapters=(4,), req_rate=4.0, duration_s=2.0, output_range=(4, 8),
                     input_range=(8, 24), max_loras=2, peft_max_n=4, timeout_s=120.0)
FULL = ServeProfile()


class _Clock:
    """Process CPU seconds plus skipped idle seconds (see the module docstring). With ``wall`` (CUDA runs, where
    the work happens on the device, not in this process's CPU time): wall seconds plus skipped idle seconds —
    every system reads its sampled tokens back to the host each step, so the clock includes the device's work."""

    def __init__(self, wall: bool = False):
        self.timer = time.perf_counter if wall else time.process_time
        self.skipped, self.start = 0.0, self.timer()

    def now(self) -> float:
        return self.timer() - self.start + self.skipped

    def skip_to(self, t: float) -> None:
        self.skipped += max(0.0, t - self.now())


@dataclass
class _Run:
    clock: _Clock = field(default_factory=_Clock)
    done: dict[int, tuple[float, float]] = field(default_factory=dict)  # index -> (ttft, latency) seconds
    tokens: int = 0


def _prompt(req: TraceRequest, vocab: int) -> list[int]:
    g = np.random.RandomState(1000 + req.index)
    return g.randint(3, vocab, req.input_len).tolist()


def _base(model_name: str, seed: int, device: str = "cpu", dtype: str = "float32"):
    if model_name == "bundled":
        from ..hub import load_model_and_tokenizer
        model = load_model_and_tokenizer()[0]
    else:
        model = bench_model(seed)
    return model.to(device=device, dtype=getattr(torch, dtype))


# -- systems: submit(req) / step() -> bool (did work) / holds() -> bytes -----------------------------------------
class _EngineSystem:
    """The engine; a request's ``profile.choices`` choices share the prompt's prefill (``share``) or are separate
    requests."""

    def __init__(self, model, dirs: dict[str, Path] | None, profile: ServeProfile, run: _Run, graphs: bool = False,
                 share: bool = True):
        from ..serving.engine import Engine
        from ..serving.store import AdapterStore

        t = time.process_time()
        self.store = None
        if dirs:
            root = next(iter(dirs.values())).parent
            self.store = AdapterStore(model, [root], max_loras=profile.max_loras, max_cpu_loras=4 * profile.max_loras)
            # on_error="raise": the bench wrote these folders itself; one that failed to register would be a bug, and
            # skipping it would quietly change the workload measured
            self.store.register_dir(root)
            self.names = {i: d.name for i, d in enumerate(dirs.values())}
        self.load_s = time.process_time() - t
        self.engine = Engine(model, store=self.store, kv_cache_bytes=profile.kv_cache_mb << 20,
                             max_batch=profile.max_batch, cuda_graphs=graphs)
        if graphs:  # every bucket built (on CUDA: captured) before the trace starts, as a server does at startup
            if self.store is not None:
                self.store.ensure_resident(self.names[0])  # the banks exist from the first load on
            self.engine.graphs.capture_all(profile.input_range[1] + profile.output_range[1])
        self.vocab, self.run = model.config.vocab_size, run
        self.choices, self.share = profile.choices, share

    def submit(self, req: TraceRequest) -> None:
        from ..serving.sampling import SamplingParams

        run, first, left, k = self.run, [], [self.choices], self.choices

        def on_event(ev, req=req):  # the request is done when its last choice is
            if ev.token_ids and not first:
                first.append(run.clock.now())
            if ev.finished:
                left[0] -= 1
                if left[0] == 0:
                    run.done[req.index] = (first[0] - req.arrival_s, run.clock.now() - req.arrival_s)
                    run.tokens += sum(len(h.output_ids) for h in handles)
        name = self.names[req.adapter] if self.store is not None else None
        if k == 1:  # greedy, as the other systems
            params = [SamplingParams(max_tokens=req.output_len, ignore_eos=True)]
        else:  # the choices differ: sampled, choice i with its own seed (the same in both ways of submitting them)
            params = [SamplingParams(max_tokens=req.output_len, ignore_eos=True, temperature=1.0,
                                     seed=req.index * k + i) for i in range(k)]
        prompt = _prompt(req, self.vocab)
        if self.share:
            handles = self.engine.submit_choices(prompt, name, params, on_event=on_event)
        else:
            handles = [self.engine.submit(prompt, name, p, on_event=on_event) for p in params]

    def step(self) -> bool:
        return self.engine.step()

    def holds(self) -> int:
        adapters = self.store.registry.memory_bytes() if self.store is not None else 0
        return self.engine.cache.nbytes + adapters


class _PeftSystem:
    """A PEFT server loop: static batches via ``generate``; ``swap`` = one adapter per batch, hot-swapped from disk."""

    def __init__(self, model, dirs: dict[str, Path], profile: ServeProfile, run: _Run, swap: bool):
        from peft import PeftModel

        self.names = list(dirs)
        self.dirs, self.swap, self.run, self.max_batch = dirs, swap, run, profile.max_batch
        t = time.process_time()
        first = self.names[0]
        self.model = PeftModel.from_pretrained(model, str(dirs[first]), adapter_name="default" if swap else first)
        if not swap:
            for n in self.names[1:]:
                self.model.load_adapter(str(dirs[n]), adapter_name=n)
        self.model.eval()
        self.current = first
        self.load_s = time.process_time() - t
        self.queue: list[tuple[TraceRequest, float]] = []
        self.vocab = model.config.vocab_size

    def submit(self, req: TraceRequest) -> None:
        self.queue.append((req, req.arrival_s))

    def step(self) -> bool:
        from transformers import LogitsProcessor, LogitsProcessorList

        if not self.queue:
            return False
        if self.swap:
            want = self.names[self.queue[0][0].adapter]
            batch = [q for q in self.queue if q[0].adapter == self.queue[0][0].adapter][: self.max_batch]
            if want != self.current:
                from peft.utils.hotswap import hotswap_adapter
                t = time.process_time()
                hotswap_adapter(self.model, str(self.dirs[want]), adapter_name="default")
                self.load_s += time.process_time() - t
                self.current = want
        else:
            batch = self.queue[: self.max_batch]
        for q in batch:
            self.queue.remove(q)
        prompts = [_prompt(q[0], self.vocab) for q in batch]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generate needs
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        first, clock = [], self.run.clock

        class _FirstToken(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if not first:
                    first.append(clock.now())
                return scores
        steps = max(q[0].output_len for q in batch)
        kw = {} if self.swap else {"adapter_names": [self.names[q[0].adapter] for q in batch]}
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=steps, min_new_tokens=steps,
                                do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([_FirstToken()]),
                                **kw)
        end = clock.now()
        for q, arrival in batch:
            self.run.done[q.index] = (first[0] - arrival, end - arrival)
            self.run.tokens += q.output_len
        return True

    def holds(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)


def _replay(system, trace: list[TraceRequest], run: _Run, timeout_s: float, wall: bool = False) -> float:
    """Feed requests at their arrival times; step the system until every request is done. Returns the makespan
    (virtual seconds)."""
    run.clock = clock = _Clock(wall)
    wall = time.perf_counter()
    pending = list(trace)
    while len(run.done) < len(trace):
        if time.perf_counter() - wall > timeout_s:
            raise TimeoutError(f"serving benchmark run exceeded {timeout_s:.0f} s of wall time")
        while pending and pending[0].arrival_s <= clock.now():
            system.submit(pending.pop(0))
        if not system.step() and pending:
            clock.skip_to(pending[0].arrival_s)  # idle until the next arrival
    return clock.now()


def _summary(run: _Run, trace: list[TraceRequest], makespan: float, slo_s: float) -> dict:
    ttft = np.array([run.done[r.index][0] for r in trace])
    lat = np.array([run.done[r.index][1] for r in trace])
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return {"requests": len(trace), "makespan_s": makespan, "throughput_rps": len(trace) / makespan,
            "throughput_tok_s": run.tokens / makespan, "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99), "latency_mean_s": float(lat.mean()), "latency_p50_s": pct(lat, 50),
            "latency_p90_s": pct(lat, 90), "latency_p99_s": pct(lat, 99),
            "slo_attainment": float((ttft < slo_s).mean())}


def run_serve_bench(profile: ServeProfile = FULL, log=print, checkpoint: Path | None = None) -> dict:
    """Every (model, N) row of ``profile``; with ``checkpoint``, the result so far is written there after each row."""
    wall = profile.device != "cpu"
    if not wall:
        torch.set_num_threads(1)
    base = lambda name: _base(name, profile.seed, profile.device, profile.dtype)  # noqa: E731
    result = {"profile": {k: getattr(profile, k) for k in profile.__dataclass_fields__}, "rows": [],
              "clock": "wall seconds (device work synchronised by each step's token read-back)" if wall
              else "process CPU seconds + skipped idle time"}
    for model_name in profile.models:
        for n in profile.num_adapters:
            trace = generate_requests(n, profile.alpha, profile.req_rate, profile.cv, profile.duration_s,
                                      profile.input_range, profile.output_range, profile.seed)
            with tempfile.TemporaryDirectory() as tmp:
                dirs = write_random_adapters(_base(model_name, profile.seed), Path(tmp) / "adapters", n, r=profile.r,
                                             alpha=2 * profile.r, seed=profile.seed)
                row = {"model": model_name, "num_adapters": n, "systems": {}}
                for system in profile.systems:
                    if system.startswith("peft") and n > profile.peft_max_n:
                        row["systems"][system] = {"skipped": f"n={n} > peft_max_n={profile.peft_max_n}"}
                        continue
                    run = _Run()
                    model = base(model_name)
                    if system in ("lorakit", "lorakit_graphs", "lorakit_unshared"):
                        sut = _EngineSystem(model, dirs, profile, run, graphs=system == "lorakit_graphs",
                                            share=system != "lorakit_unshared")
                    elif system in ("merged", "merged_graphs"):
                        sut = _merged(model, dirs, profile, run, graphs=system == "merged_graphs")
                    else:
                        sut = _PeftSystem(model, dirs, profile, run, swap=system == "peft_swap")
                    started = time.perf_counter()
                    makespan = _replay(sut, trace, run, profile.timeout_s, wall)
                    stats = _summary(run, trace, makespan, profile.slo_s)
                    stats.update(adapter_load_s=sut.load_s, memory_bytes=sut.holds(),
                                 wall_s=time.perf_counter() - started)
                    if isinstance(sut, _EngineSystem):
                        stats["prefill_tokens"] = sut.engine.stats["prefill_tokens"]
                    row["systems"][system] = stats
                    log(f"{model_name} n={n} {system}: {stats['throughput_rps']:.2f} req/s, "
                        f"ttft p50 {stats['ttft_p50_s']:.2f}s, p99 latency {stats['latency_p99_s']:.2f}s, "
                        f"{stats.get('prefill_tokens', '-')} prefill tokens, {stats['wall_s']:.1f} s wall")
                    del sut, model
                    gc.collect()
                s = row["systems"]
                tput = lambda k: s.get(k, {}).get("throughput_rps")  # noqa: E731
                row["ratios"] = {name: tput(a) / tput(b) for name, a, b in RATIOS if tput(a) and tput(b)}
                result["rows"].append(row)
                if checkpoint is not None:
                    from ..io.files import atomic_write_json
                    atomic_write_json(checkpoint, result)
    return result


def _merged(model, dirs, profile, run, graphs: bool = False):
    """(a): the first adapter merged into the base weights; every request runs on it (no adapter at run time)."""
    from ..core.model import merge_and_unload
    from ..io.peft_format import load_adapter

    t = time.process_time()
    load_adapter(model, next(iter(dirs.values())), "merged")
    model = merge_and_unload(model)
    sut = _EngineSystem(model, None, profile, run, graphs=graphs)
    sut.load_s = time.process_time() - t
    return sut


def serve_markdown(result: dict) -> str:
    lines = ["| model | N | system | req/s | tok/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 / p99 (s) | SLO | "
             "adapter+KV MB | load (s) | prefill tokens | wall (s) |", "|" + "---|" * 13]
    for row in result["rows"]:
        for name, s in row["systems"].items():
            if "skipped" in s:
                lines.append(f"| {row['model']} | {row['num_adapters']} | {name} | skipped: {s['skipped']} |||||||||")
                continue
            lines.append(f"| {row['model']} | {row['num_adapters']} | {name} | {s['throughput_rps']:.2f} | "
                         f"{s['throughput_tok_s']:.1f} | {s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | "
                         f"{s['latency_p50_s']:.2f} / {s['latency_p99_s']:.2f} | {s['slo_attainment']:.2f} | "
                         f"{s['memory_bytes'] / 2**20:.1f} | {s['adapter_load_s']:.2f} | "
                         f"{s.get('prefill_tokens', '–')} | {s['wall_s']:.1f} |")
    names = [name for name, a, b in RATIOS
             if name in ("lorakit/merged", "lorakit/peft_mixed", "lorakit/peft_swap")
             or any(name in row["ratios"] for row in result["rows"])]
    lines += ["", "| model | N | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        r = row["ratios"]
        cells = [f"{r[k]:.2f}" if k in r else "–" for k in names]
        lines.append(f"| {row['model']} | {row['num_adapters']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_serve(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model_name in sorted({r["model"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["model"] == model_name]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for system in result["profile"]["systems"]:
            pts = [(r["num_adapters"], r["systems"][system]) for r in rows
                   if system in r["systems"] and "skipped" not in r["systems"][system]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["throughput_rps"] for p in pts], marker="o", label=system)
            axes[1].plot(xs, [p[1]["latency_p99_s"] for p in pts], marker="o", label=system)
        for ax, label in zip(axes, ["throughput (req/s)", "p99 latency (s)"]):
            ax.set_xscale("log")
            ax.set_xlabel("adapters (N)")
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle(f"lorakit bench serve — {model_name}")
        fig.tight_layout()
        path = out / f"serve_{model_name}.png"
        save_figure(fig, path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
