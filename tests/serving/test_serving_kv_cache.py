"""The paged KV cache's memory: what it reports is what it allocates, and the budget bounds that.

Was: ``nbytes`` (the Prometheus ``lorakit_kv_cache_bytes``, ``lorakit bench serve``'s memory column) counted the
scratch token slot (one token of every layer, written by padding rows of static decode steps) while the budget counted
blocks only, so a cache could report more bytes than its budget. Expected values come from the tensor shapes
documented in ``kv_cache.py`` — k and v of (layers, blocks * block_size + 1, kv_heads, head_dim) — times the dtype's
size, with the model's geometry read from its config fields, not from the cache.
"""

from __future__ import annotations

import re

import pytest
import torch

from lk_models import tiny_llama
from lorakit.core.errors import LorakitError
from lorakit.serving.engine import Engine
from lorakit.serving.kv_cache import CacheFullError, PagedKVCache


def _geometry(config):
    """(layers, kv heads, head dim) of tiny_llama's LlamaConfig, from its fields."""
    return config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("blocks,block_size", [(1, 4), (7, 4), (5, 16)])
def test_cache_bytes_are_the_allocated_bytes_and_within_the_budget(dtype, itemsize, blocks, block_size):
    config = tiny_llama().config
    layers, kv_heads, head_dim = _geometry(config)
    assert (layers, kv_heads, head_dim) == (2, 2, 8)
    token = 2 * layers * kv_heads * head_dim * itemsize  # k and v of one token slot in every layer
    allocated = 2 * layers * (blocks * block_size + 1) * kv_heads * head_dim * itemsize  # blocks + the scratch slot
    assert allocated == blocks * block_size * token + token
    cache = PagedKVCache.from_budget(config, allocated, block_size=block_size, dtype=dtype)
    assert cache.num_blocks == blocks and cache.capacity_tokens == blocks * block_size
    assert cache.k.shape == cache.v.shape == (layers, blocks * block_size + 1, kv_heads, head_dim)
    assert cache.nbytes == allocated
    assert cache.nbytes == cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes()
    # a byte less cannot hold the scratch slot beside these blocks: one block fewer (or none: refused)
    if blocks > 1:
        smaller = PagedKVCache.from_budget(config, allocated - 1, block_size=block_size, dtype=dtype)
        assert smaller.num_blocks == blocks - 1 and smaller.nbytes <= allocated - 1
    else:
        with pytest.raises(LorakitError, match="below one block and the scratch token slot"):
            PagedKVCache.from_budget(config, allocated - 1, block_size=block_size, dtype=dtype)


def test_any_budget_bounds_the_allocated_bytes():
    config = tiny_llama().config
    layers, kv_heads, head_dim = _geometry(config)
    block = 2 * layers * 4 * kv_heads * head_dim * 4  # bytes of one 4-token block, fp32
    for budget in range(block + block // 4, 8 * block, 97):
        cache = PagedKVCache.from_budget(config, budget, block_size=4)
        assert cache.nbytes <= budget < cache.nbytes + block, budget  # within a block of the budget, never above


def test_metric_and_bench_report_the_allocated_bytes():
    """``/metrics``'s lorakit_kv_cache_bytes and ``lorakit bench serve``'s memory (no adapters: the cache alone)."""
    pytest.importorskip("prometheus_client")
    pytest.importorskip("fastapi")
    from lorakit.bench.serve import ServeProfile, _EngineSystem, _Run
    from lorakit.serving.server import create_app

    budget = 1 << 20
    engine = Engine(tiny_llama(), kv_cache_bytes=budget, block_size=16)  # the bench's engine: the default 16
    layers, kv_heads, head_dim = _geometry(engine.model.config)
    allocated = 2 * layers * (engine.cache.num_blocks * 16 + 1) * kv_heads * head_dim * 4
    assert engine.cache.nbytes == allocated <= budget
    text = create_app(engine).state.metrics.render().decode()
    assert float(re.search(r"^lorakit_kv_cache_bytes (\S+)$", text, re.M).group(1)) == allocated
    system = _EngineSystem(tiny_llama(), None, ServeProfile(kv_cache_mb=budget >> 20), _Run())
    assert system.holds() == allocated


def _filled_cache(num_blocks=8, block_size=4):
    cache = PagedKVCache(2, 2, 8, num_blocks=num_blocks, block_size=block_size)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


def _block(t, b, bs=4):
    return t[:, b * bs:(b + 1) * bs].clone()


@pytest.mark.parametrize("num_tokens", [9, 12])
def test_fork_shares_full_blocks_and_copies_the_partial_last_one(num_tokens):
    """PagedAttention's parallel sampling (arXiv:2309.06180 §4.4; vLLM v0 block_manager_v1 ``fork`` + copy-on-write of
    the shared last block): the n forked tables hold the same first ``num_tokens`` tokens; full blocks are the same
    ids, held once more per table; a partly filled last block (9 tokens in 4-token blocks: block 3 holds 1) is a fresh
    block per table with the same keys and values in every layer. Freed when the last holder releases it."""
    cache = _filled_cache()
    parent = cache.allocate(3)
    before_k, before_v = _block(cache.k, parent[2]), _block(cache.v, parent[2])
    tables = cache.fork(parent, num_tokens, 3)
    full = num_tokens // 4
    assert all(t[:full] == parent[:full] for t in tables)
    assert [cache.ref_count(b) for b in parent] == [4] * full + [1] * (3 - full)
    if num_tokens % 4:
        own = [t[-1] for t in tables]
        assert len(set(own) | {parent[2]}) == 4 and all(len(t) == 3 for t in tables)
        for b in own:
            assert cache.ref_count(b) == 1
            assert torch.equal(_block(cache.k, b), before_k) and torch.equal(_block(cache.v, b), before_v)
        assert cache.free_blocks == 8 - 3 - 3
    else:
        assert all(len(t) == 3 for t in tables) and cache.free_blocks == 8 - 3
    for t in tables:
        cache.release(t)
    assert [cache.ref_count(b) for b in parent] == [1, 1, 1] and cache.free_blocks == 8 - 3
    cache.release(parent)
    assert cache.free_blocks == 8 and cache.used_blocks == 0


def test_fork_without_room_changes_nothing_and_double_release_is_refused():
    cache = _filled_cache(num_blocks=4)
    parent = cache.allocate(3)
    with pytest.raises(CacheFullError):
        cache.fork(parent, 9, 2)  # two copies of the partial block, one block free
    assert [cache.ref_count(b) for b in parent] == [1, 1, 1] and cache.free_blocks == 1
    with pytest.raises(LorakitError, match="holds at most 12 tokens"):
        cache.fork(parent, 13, 1)
    cache.release(parent)
    with pytest.raises(LorakitError, match="released more often"):
        cache.release(parent[:1])
