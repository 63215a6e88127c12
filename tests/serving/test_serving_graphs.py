"""The static-shape decode step (``serving/graphs.py``, ``Engine(cuda_graphs=True)``), on the CPU where it runs
eagerly: its greedy tokens equal the eager engine's (mixed adapters of different ranks, base rows, a weighted mix on
the eager path, requests joining and leaving, batch and context buckets crossed, a KV cache so small that requests
are preempted), adapter loads under a store write into storage reserved up front (no reset), a bank reallocated
anyway drops the static buffers, and the step does no host read (run on the meta device under a dispatch mode that
refuses host reads, data-dependent shapes and host tensors; the eager path, run the same way, is caught)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lk_models import tiny_llama
from lorakit.core.errors import LorakitError
from lorakit.core.routing import routing
from lorakit.serving import load_adapters
from lorakit.serving.bank import storage_epoch
from lorakit.serving.engine import Engine
from lorakit.serving.graphs import DecodeGraphs, buckets
from lorakit.serving.kv_cache import PagedBatch, PagedKVCache, paged_batch
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore


def _run(sh, dirs, graphs, blocks, max_batch, prompts, specs, params, store_root=None, max_loras=None):
    model = tiny_llama()
    store = None
    if store_root is not None:
        store = AdapterStore(model, [store_root], max_loras=max_loras)
        store.register_dir(store_root)
    else:
        load_adapters(model, dirs)
    engine = Engine(model, store=store, kv_cache_bytes=sh.kv_budget(model, blocks), block_size=4, max_batch=max_batch,
                    cuda_graphs=graphs)
    reqs = engine.generate(prompts, specs, params)
    assert all(r.error is None for r in reqs)
    assert engine.cache.used_blocks == 0 and not engine.running
    return engine, [r.output_ids for r in reqs]


def test_buckets():
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(64, 4) == [4, 8, 16, 32, 64]
    assert buckets(1) == [1]
    with pytest.raises(LorakitError, match="bucket limit"):
        buckets(0)


@pytest.mark.parametrize("blocks,max_batch", [(64, 8), (9, 4)])
def test_static_decode_equals_eager_engine(ranked_adapters, blocks, max_batch, sh):
    """(64 blocks) all fit; (9 blocks of 4 tokens) requests queue and running ones are preempted and recomputed.
    Different max_tokens make requests leave at different steps, so the batch crosses buckets 8/4/2/1 and contexts
    cross context buckets."""
    _, dirs = ranked_adapters
    prompts = sh.random_prompts(11, seed=3)
    specs = ["a0", None, "a1", "a2", "a3", "a0", None, "a3", {"a0": 0.7, "a2": 0.3}, "a1", "a2"]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (14, 3, 9, 1, 12, 6, 17, 2, 8, 11, 5)]
    eager, want = _run(sh, dirs, False, blocks, max_batch, prompts, specs, params)
    engine, got = _run(sh, dirs, True, blocks, max_batch, prompts, specs, params)
    assert got == want
    stats = engine.graphs.stats
    assert stats["steps"] > 0 and stats["captures"] == 0  # the static step ran (eagerly: no CUDA here)
    used = set(engine.graphs._static)
    assert {b for b, _ in used} >= {1, 2, 4} and len({c for _, c in used}) >= 2, used
    assert engine.stats["decode_tokens"] == eager.stats["decode_tokens"]
    if blocks == 9:
        assert engine.stats["preemptions"] > 0 and eager.stats["preemptions"] > 0
    else:  # every decode row ran static but the weighted mix's 7 (8 tokens, the first from its prefill)
        assert stats["rows"] == engine.stats["decode_tokens"] - 7


def test_static_decode_with_a_store_loads_into_reserved_storage(ranked_adapters, sh):
    """max_loras=2 of 4 adapters: adapters are evicted and loaded while the static buffers exist; the banks were
    reserved for 2 adapters at the largest registered rank before the first static step, so no load reallocates
    them (no reset) and the tokens equal the eager engine's."""
    root, dirs = ranked_adapters
    prompts = sh.random_prompts(10, seed=4)
    specs = [f"a{i % 4}" if i % 3 else None for i in range(10)]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    eager, want = _run(sh, dirs, False, 64, 3, prompts, specs, params, store_root=root, max_loras=2)
    engine, got = _run(sh, dirs, True, 64, 3, prompts, specs, params, store_root=root, max_loras=2)
    assert got == want
    assert engine.store.stats["evictions"] > 0 and engine.graphs.stats["steps"] > 0
    assert engine.graphs.stats["resets"] == 0
    bank = engine.model.model.layers[0].self_attn.q_proj.bank
    assert bank.capacity == 3 and bank.r_max == 11  # 2 adapters + the zero slot, rank of a3 (r = 2 + 3 * 3)


def test_static_decode_resets_when_a_bank_is_reallocated(ranked_adapters, sh, tmp_path):
    """Loading an adapter of a larger rank than reserved grows the banks (new storage): the storage epoch moves,
    the static buffers (and on CUDA the graphs) are dropped and rebuilt, and the new adapter's tokens are right."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, {"a0": dirs["a0"]})
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=4, cuda_graphs=True)
    prompts = sh.random_prompts(3, seed=5)
    engine.generate(prompts, ["a0", None, "a0"], SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.graphs.stats["resets"] == 0 and engine.graphs._static
    epoch = storage_epoch()
    big = sh.make_adapter(tmp_path / "big", seed=99, r=16)
    load_adapters(model, {"big": big})
    assert storage_epoch() != epoch
    got = engine.generate(prompts, ["big", "a0", None], SamplingParams(max_tokens=6, ignore_eos=True))
    assert engine.graphs.stats["resets"] == 1
    reference = tiny_llama()
    load_adapters(reference, {"a0": dirs["a0"], "big": big})
    eager = Engine(reference, kv_cache_bytes=sh.kv_budget(reference, 64), block_size=4, max_batch=4)
    want = eager.generate(prompts, ["big", "a0", None], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [r.output_ids for r in got] == [r.output_ids for r in want]


def test_capture_all_builds_every_bucket_before_requests(ranked_adapters, sh):
    """``capture_all`` (a server's startup) builds every bucket with padding rows only, touching no block; later
    steps reuse those buffers (on CUDA: replay those graphs) and give the eager engine's tokens."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 32), block_size=4, max_batch=4, cuda_graphs=True)
    assert engine.graphs.capture_all() == len(buckets(4)) * len(buckets(64, 4)) == 15
    assert engine.cache.used_blocks == 0
    built = dict(engine.graphs._static)
    small = Engine(tiny_llama(), kv_cache_bytes=sh.kv_budget(model, 32), block_size=4, max_batch=4, cuda_graphs=True)
    assert small.graphs.capture_all(max_context=9) == 3 * 3  # context buckets 4, 8, 16 (16 holds 9 tokens)
    prompts, specs = sh.random_prompts(5, seed=7), ["a1", None, "a3", "a0", "a2"]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = [r.output_ids for r in engine.generate(prompts, specs, params)]
    _, want = _run(sh, dirs, False, 32, 4, prompts, specs, params)
    assert got == want and engine.graphs.stats["resets"] == 0
    assert engine.graphs._static.keys() == built.keys() and all(engine.graphs._static[k] is v for k, v in built.items())


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"),
                                    pytest.param(True, id="triton", marks=pytest.mark.slow)])  # (interpreter: ~40 s)
def test_static_decode_with_bias_partial_targets_and_the_fused_kernel(tmp_path, sh, kernel):
    """Adapters with ``lora_bias`` and with other target modules (banks whose id -> slot tables differ) in one static
    batch; with the Triton BGMV kernel registered for the CPU (Triton's interpreter: the CUDA path's plan, the kernel
    at full ``r_max`` with each slot's rank) the tokens still equal the eager engine's."""
    dirs = {n: sh.make_adapter(tmp_path / n, seed, **cfg) for seed, (n, cfg) in enumerate(
        {"r2": dict(r=2, lora_alpha=4), "bias": dict(r=4, lora_alpha=8, lora_bias=True),
         "qv": dict(r=6, lora_alpha=8, target_modules=["q_proj", "v_proj"])}.items())}
    before = None
    if kernel:
        pytest.importorskip("triton")
        from lorakit.serving import bank, register_kernel, triton_bgmv
        before = bank._KERNELS.get("cpu")
        register_kernel("cpu", triton_bgmv.lora_bgmv)
    try:
        prompts, specs = sh.random_prompts(4, seed=8), ["qv", "bias", None, "r2"]
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        _, want = _run(sh, dirs, False, 64, 4, prompts, specs, params)
        engine, got = _run(sh, dirs, True, 64, 4, prompts, specs, params)
    finally:
        if kernel:
            register_kernel("cpu", before)
    assert got == want and engine.graphs.stats["rows"] == 4 * 3


# -- no host synchronisation -----------------------------------------------------------------------------------
class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Refuses what would synchronise a CUDA stream or break a capture: reading a value to the host (``.item()``,
    ``int(t)``, ``bool(t)``: ``aten._local_scalar_dense``), ops whose output shape depends on the data (boolean
    indexing, ``nonzero``, ``unique``, ``masked_select``), and any tensor on another device than ``device`` (a
    host tensor built inside the step would be copied from freed host memory at each replay). On the meta
    device, reads that bypass the dispatcher (``.tolist()``, ``.numpy()``) fail on their own."""

    DATA_DEPENDENT = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "is_nonzero", "equal",
                      "repeat_interleave", "argwhere")

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in self.DATA_DEPENDENT or name.startswith(("unique", "_unique")):
            raise HostReadError(f"{func} reads device data on the host or has a data-dependent shape")
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                if a.device != self.device:
                    raise HostReadError(f"{func} takes a tensor on {a.device} inside the step")
                if a.dtype == torch.bool and name in ("index", "index_put", "index_put_"):
                    raise HostReadError(f"{func} with a boolean index (data-dependent shape)")
        device = kwargs.get("device")
        if device is not None and torch.device(device) != self.device:
            raise HostReadError(f"{func} copies to {device} inside the step (a read back to the host)")
        self.ops += 1
        return func(*args, **kwargs)


@pytest.fixture()
def meta_graphs(ranked_adapters, sh):
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, {"a0": dirs["a0"], "a3": dirs["a3"]})
    model.to("meta")
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 16), block_size=4, max_batch=4, cuda_graphs=True)
    graphs = engine.graphs
    graphs._reserve(graphs._registry())
    return graphs


@pytest.mark.parametrize("batch,ctx", [(1, 4), (4, 16)])
def test_static_step_does_no_host_read(meta_graphs, batch, ctx):
    st = meta_graphs._buffers(batch, ctx)
    mode = NoHostReads("meta")
    with torch.inference_mode(), mode:
        logits = meta_graphs._step(st, banked=True)
    assert logits.shape == (batch, 96) and logits.device.type == "meta"
    # every adapted linear ran its bank on the device: 14 banks x (gather A, gather B) and more
    assert mode.ops > 100


def test_the_host_read_check_catches_the_eager_paths(meta_graphs):
    """The checker is not vacuous: the eager engine's forward (boolean-indexed cache writes for a padded batch;
    banks that range-check the ids on the host) fails under it."""
    g = meta_graphs
    st = g._buffers(2, 8)
    ids, pos = st.view(0), st.view(1)
    mask = (st.positions[None, :] <= pos)[:, None, None, :]
    padded = PagedBatch(g.cache, st.view(3), st.view(4, 8), mask, dense=False)
    with torch.inference_mode(), NoHostReads("meta"), paged_batch(padded):
        with pytest.raises(HostReadError, match="boolean index|nonzero"):
            g.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    dense = PagedBatch(g.cache, st.view(3), st.view(4, 8), mask, dense=True)
    with torch.inference_mode(), NoHostReads("meta"), paged_batch(dense), routing(adapter_ids=st.view(2)):
        with pytest.raises(HostReadError, match="_local_scalar_dense|read back to the host"):
            g.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)


def test_cuda_graphs_need_a_cuda_device(sh):
    model = tiny_llama()
    cache = PagedKVCache.from_budget(model.config, sh.kv_budget(model, 8), block_size=4)
    with pytest.raises(LorakitError, match="CUDA device"):
        DecodeGraphs(model, cache, max_batch=4, max_context=32, capture=True)


def test_forked_choices_decode_on_the_static_step_as_separate_requests(ranked_adapters, sh):
    """n choices of one prompt (Engine.submit_choices: one prefill, the others fork its KV blocks, full ones shared)
    decode on the static step with the tokens of n separate requests on the eager engine."""
    _, dirs = ranked_adapters
    prompt = list(range(5, 14))  # 9 tokens: two full 4-token blocks shared, the third copied per choice
    params = [SamplingParams(max_tokens=7, temperature=1.0, seed=3 + i, ignore_eos=True) for i in range(3)]
    _, want = _run(sh, dirs, False, 64, 8, [prompt] * 3, ["a1"] * 3, params)
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=8, cuda_graphs=True)
    reqs = engine.generate_choices(prompt, "a1", params)
    assert [r.output_ids for r in reqs] == want and engine.stats["forked"] == 2
    assert engine.stats["prefill_tokens"] == len(prompt) and engine.cache.used_blocks == 0
