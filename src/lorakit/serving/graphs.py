"""Static-shape decode steps, captured in CUDA graphs on a GPU (``Engine(..., cuda_graphs=True)``).

On a small model a decode step is bound by host work and kernel launches, not by arithmetic
(``benchmarks/serve_cuda/README.md``: 56 banks added ~180 µs of host time each per step on an H200). vLLM's answer
(Kwon et al., arXiv:2309.06180; ``CUDAGraphRunner`` in vLLM's model runner) is to record the whole decode forward
once per batch-size bucket as a CUDA graph and replay it: one launch, no Python per layer. A graph replays fixed
device addresses and fixed shapes, so the step here is written for that:

- Static inputs per (batch bucket B, context bucket C): one flat long buffer on the device holding, as views,
  ``input_ids`` (B, 1), ``position_ids`` (B, 1), ``adapter_ids`` (B, 1), ``write_slots`` (B, 1) and ``read_slots``
  (B, C); the host fills a CPU copy and sends it with one copy per step. Buckets are powers of two up to
  ``max_batch`` (batch) and from the block size up to the longest context the model and cache allow (context).
- Padding rows (B > rows) carry token 0 at position 0, adapter id -1 (the base: every bank's zero slot) and read
  and write the cache's ``scratch_slot``, a token slot outside every block, so all rows are written with one
  ``index_copy_`` (``PagedBatch.dense``) and no boolean indexing. Context positions past a row's own are read from
  the scratch slot and masked; the mask is computed on the device from ``position_ids``.
- The attention mask goes to the model as a prepared 4-D mask, so transformers' mask builder returns it as is (its
  packed-sequence check reads ``position_ids`` back to the host otherwise).
- Banks run their static plan (``bank.STATIC_KEY``): slots gathered on the device, per row at full ``r_max``, no
  host read, nothing cached. Their storage is reserved up front for ``max_adapters`` adapters at the largest rank
  known (:meth:`AdapterRegistry.reserve_static`), so adapter loads between steps write where the graphs read;
  whenever storage is reallocated anyway (``bank.storage_epoch`` changes) every graph is dropped and recaptured.
- Sampling stays on the host, reading the step's static logits (B, vocab): the engine's sampling code is shared.

On CUDA (``capture=True``, the default there) each bucket is captured on first use (after ``warmup`` eager runs
on a side stream, which also compiles the Triton kernels) and replayed from then on. Elsewhere the same static step
runs eagerly, so CPU tests check that it gives the eager engine's tokens and that it does no host read
(``tests/serving/test_serving_graphs.py``). Rows the static step does not take run on the eager path: prefill,
weighted adapter mixes (``{"a": .7, "b": .3}``), attached adapters (DoRA, mixtures).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..core.errors import LorakitError
from ..core.routing import routing
from .bank import STATIC_KEY, storage_epoch
from .kv_cache import PagedBatch, PagedKVCache, block_table, paged_batch
from .multi import REGISTRY_ATTR, RowSpec

log = logging.getLogger(__name__)


def buckets(limit: int, low: int = 1) -> list[int]:
    """Powers of two from ``low`` (itself rounded up to one) below ``limit``, then ``limit``: the sizes a
    static step is built for."""
    if limit < 1:
        raise LorakitError(f"a bucket limit must be >= 1, got {limit}")
    out, b = [], 1
    while b < max(low, 1):
        b *= 2
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def _bucket(n: int, sizes: list[int]) -> int:
    for b in sizes:
        if b >= n:
            return b
    raise LorakitError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass
class _Static:
    """The device buffers (and the graph, once captured) of one (batch B, context C) bucket."""

    flat: torch.Tensor  # (4 * B + B * C,) long: every integer input, views below
    positions: torch.Tensor  # (C,) long: 0 .. C-1, for the mask
    host: torch.Tensor  # (4 * B + B * C,) long on the host, filled per step and copied to ``flat``
    batch: int
    ctx: int
    logits: torch.Tensor | None = None  # (B, vocab): the captured step's output
    graph: object | None = None  # torch.cuda.CUDAGraph

    def view(self, i: int, width: int = 1) -> torch.Tensor:
        b = self.batch
        return self.flat[i * b: i * b + b * width].view(b, width)


@dataclass(eq=False)
class DecodeGraphs:
    """The engine's static decode step for banked rows; see the module docstring.

    Args:
        model: the engine's model (paged attention already installed).
        cache: the engine's :class:`PagedKVCache` (its ``scratch_slot`` takes the padding rows).
        max_batch: the largest batch bucket. max_context: the longest context (tokens) a row can have.
        max_adapters: banked adapters to reserve storage for (a store's ``max_loras``; None = those loaded).
        max_rank: rank to reserve up to (None = the largest rank loaded or registered in ``store``).
        capture: record CUDA graphs (default: when the cache is on a CUDA device); otherwise the static step runs
            eagerly. warmup: eager runs before each capture.
        store: the engine's AdapterStore, for the ranks of registered, not yet loaded adapters.
    """

    model: nn.Module
    cache: PagedKVCache
    max_batch: int
    max_context: int
    max_adapters: int | None = None
    max_rank: int | None = None
    capture: bool | None = None
    warmup: int = 2
    store: object | None = None
    stats: dict = field(default_factory=lambda: {"steps": 0, "rows": 0, "captures": 0, "replays": 0, "resets": 0})

    def __post_init__(self):
        self.device = self.cache.k.device
        if self.capture is None:
            self.capture = self.device.type == "cuda"
        if self.capture and self.device.type != "cuda":
            raise LorakitError(f"CUDA graphs need the model and cache on a CUDA device, not {self.device}; "
                               f"leave capture unset to run the static step eagerly")
        self.batch_sizes = buckets(self.max_batch)
        self.ctx_sizes = buckets(self.max_context, self.cache.block_size)
        self._static: dict[tuple[int, int], _Static] = {}
        self._epoch: int | None = None
        self._pool = None  # the CUDA graphs' shared memory pool

    # -- what the static step takes ----------------------------------------------------------------------------
    @staticmethod
    def takes(specs: Sequence[RowSpec]) -> bool:
        """Whether rows with these adapter specs can run in the static step (weighted mixes cannot: their
        (batch, k) ids and weights have no fixed shape)."""
        return not any(isinstance(s, Mapping) for s in specs)

    # -- banks ------------------------------------------------------------------------------------------------
    def _registry(self):
        reg = getattr(self.model, REGISTRY_ATTR, None)
        return reg if reg is not None and reg.banks else None

    def _reserve(self, reg) -> None:
        """Bank storage for every adapter the engine may hold, allocated before any capture."""
        adapters = self.max_adapters if self.max_adapters is not None else len(reg)
        rank = self.max_rank
        if rank is None:
            ranks = [b.r_max for b in reg.banks.values()]
            for config in (getattr(self.store, "configs", None) or {}).values():
                pattern = getattr(config, "rank_pattern", None) or {}
                ranks.append(max([getattr(config, "r", 0), *pattern.values()]))
            rank = max(ranks, default=0)
        reg.reserve_static(max(adapters, len(reg)), rank)

    def reset(self) -> None:
        """Drop every captured graph and static buffer (they are rebuilt on next use)."""
        self._static.clear()
        self._epoch, self._pool = None, None
        self.stats["resets"] += 1

    # -- the step ---------------------------------------------------------------------------------------------
    def _buffers(self, batch: int, ctx: int) -> _Static:
        st = self._static.get((batch, ctx))
        if st is None:
            n = 4 * batch + batch * ctx
            st = _Static(torch.zeros(n, dtype=torch.long, device=self.device),
                         torch.arange(ctx, device=self.device), torch.zeros(n, dtype=torch.long,
                                                                            pin_memory=self.device.type == "cuda"),
                         batch, ctx)
            self._static[(batch, ctx)] = st
        return st

    def _step(self, st: _Static, banked: bool) -> torch.Tensor:
        """One decode forward on ``st``'s buffers -> logits (B, vocab). Device work only: what a graph records."""
        input_ids, position_ids, adapter_ids, write_slots = (st.view(i) for i in range(4))
        read_slots = st.view(4, st.ctx)
        mask = (st.positions[None, :] <= position_ids)[:, None, None, :]  # (B, 1, 1, C): causal, own row
        batch = PagedBatch(self.cache, write_slots, read_slots, mask, dense=True)
        route = routing(adapter_ids=adapter_ids, extras={STATIC_KEY: True}) if banked else contextlib.nullcontext()
        with route, paged_batch(batch):
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        return out.logits[:, -1]

    def _capture(self, st: _Static, banked: bool) -> None:
        """Warm up and capture ``st``'s step. A capture that fails (e.g. an operation that synchronises, from a
        model this was not checked with) turns capturing off for this engine, with a warning and the reason in
        ``stats["capture_error"]``: the static step then runs eagerly and serving goes on."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation and Triton compilation, outside the capture
            for _ in range(self.warmup):
                self._step(st, banked)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # one memory pool for all buckets (vLLM's pattern, largest captured first by capture_all): graphs are
            # replayed one at a time and each output (``st.logits``) is read right after its own replay, so one
            # graph's intermediates may live where another's were (or where an earlier-captured graph's output is)
            # (thread_local: CUDA calls of other threads, e.g. a server's, do not invalidate the capture)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                st.logits = self._step(st, banked)
        except RuntimeError as e:
            self.capture = False
            self.stats["capture_error"] = f"batch {st.batch}, context {st.ctx}: {type(e).__name__}: {e}"
            log.warning("capturing the decode step in a CUDA graph failed (%s); decode steps run without graphs",
                        self.stats["capture_error"])
            return
        st.graph = graph
        self.stats["captures"] += 1

    def run(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]],
            specs: Sequence[RowSpec]) -> torch.Tensor:
        """Logits (rows, vocab) in float32 on the host for one decode token per row: row i feeds ``tokens[i]`` at
        ``positions[i]``, its blocks ``tables[i]`` (position ``positions[i]``'s block included), adapter ``specs[i]``
        (a banked name or None). Writes each row's key and value into its cache slot."""
        n = len(tokens)
        reg = self._prepare()
        st = self._buffers(_bucket(n, self.batch_sizes), _bucket(max(positions) + 1, self.ctx_sizes))
        self._fill(st, tokens, positions, tables, reg.route(specs)[0] if reg is not None else None)
        with torch.inference_mode():
            st.flat.copy_(st.host, non_blocking=True)
            if self.capture and st.graph is None:
                self._capture(st, reg is not None)
            if st.graph is None:  # not capturing (CPU), or the capture failed
                logits = self._step(st, reg is not None)
            else:
                st.graph.replay()
                self.stats["replays"] += 1
                logits = st.logits
            last = logits[:n].float().cpu()
        self.stats["steps"] += 1
        self.stats["rows"] += n
        return last

    def capture_all(self, max_context: int | None = None) -> int:
        """Build every (batch, context) bucket now, largest first, and on CUDA capture its graph with padding rows
        only (base rows on the scratch slot: no request's cache is touched), as vLLM does at startup, so that no
        capture delays a running request later. ``max_context``: only the context buckets up to the one holding
        this many tokens (longer ones are captured when first used). Call it after the banks exist (an adapter
        loaded): banks created later are new storage and drop the graphs. Returns the number of buckets built."""
        reg = self._prepare()
        top = _bucket(min(max_context or self.max_context, self.max_context), self.ctx_sizes)
        for batch in reversed(self.batch_sizes):
            for ctx in reversed([c for c in self.ctx_sizes if c <= top]):
                st = self._buffers(batch, ctx)
                if self.capture and st.graph is None:
                    self._fill(st, [], [], [], None)
                    with torch.inference_mode():
                        st.flat.copy_(st.host)
                        self._capture(st, reg is not None)
        return len(self._static)

    def _prepare(self):
        """The registry (None without banks), with the storage reserved; drops every bucket when bank storage was
        reallocated since the last step (``storage_epoch``)."""
        reg = self._registry()
        if reg is not None:
            reg.install()  # (a deleted adapter may have unwrapped layers: that bumps the storage epoch)
        if self._epoch != storage_epoch():
            if self._static:
                self.reset()
            if reg is not None:
                self._reserve(reg)
            self._epoch = storage_epoch()
        return reg

    def _fill(self, st: _Static, tokens, positions, tables, ids: torch.Tensor | None) -> None:
        """The step's integer inputs on the host (padding rows: token 0, position 0, id -1, scratch slots)."""
        b, c, n, bs = st.batch, st.ctx, len(tokens), self.cache.block_size
        scratch = self.cache.scratch_slot
        host = st.host
        host.zero_()
        host[2 * b: 3 * b] = -1
        host[3 * b:].fill_(scratch)
        if not n:
            return
        host[b: 2 * b][:n] = torch.as_tensor(positions, dtype=torch.long)
        host[:n] = torch.as_tensor(tokens, dtype=torch.long)
        if ids is not None:
            host[2 * b: 2 * b + n] = ids.reshape(n)
        table = block_table(tables)
        width = table.shape[1]
        pos = torch.arange(c)  # (C,)
        block = (pos // bs).clamp(max=width - 1)
        slots = table[:, block] * bs + pos % bs  # (n, C); positions past a row's blocks: masked, replaced below
        pos_t = torch.as_tensor(positions, dtype=torch.long)[:, None]  # (n, 1)
        read = host[4 * b:].view(b, c)
        read[:n] = torch.where(pos[None] <= pos_t, slots, torch.full_like(slots, scratch))
        host[3 * b: 3 * b + n] = read[:n].gather(1, pos_t)[:, 0]  # write slots
