"""A paged KV cache with a fixed memory budget, and the attention function that reads and writes it.

PagedAttention (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", arXiv:2309.06180): keys and values live in fixed-size blocks of ``block_size`` token slots,
preallocated once from a byte budget. A sequence owns a list of blocks (its block table); token ``p`` of a
sequence lives in slot ``table[p // block_size] * block_size + p % block_size``. Sequences grow block by
block from the free list and give their blocks back when they finish, so the memory in use never exceeds
the budget and fragmentation is at most one partly filled block per sequence.

Blocks are reference counted so that sequences can share them (the paper's §4.4 "parallel sampling": the n
samples of one prompt share the prompt's blocks). :meth:`PagedKVCache.fork` gives a prefilled prompt's table to n
more sequences: its full blocks are shared (their count goes up; nobody writes into them again), and its partly
filled last block, the one each sequence appends its next token into, is copied into a fresh block per sequence
— vLLM's copy-on-write (v0 ``vllm/core/block_manager_v1.py``: ``fork`` shares the table, ``append_slots`` copies a
shared last block before the first write into it), done at fork time because every child writes there next.
A block returns to the free list when its last holder releases it.

Storage per cache: ``k`` and ``v`` of shape (layers, blocks * block_size + 1, kv_heads, head_dim): the last token
slot (``scratch_slot``) belongs to no block; static-shape decode steps (``serving/graphs.py``) write their padding
rows there, so that every row of a fixed-size batch can be written with one ``index_copy_``.

The attention itself is a function registered with transformers' ``AttentionInterface`` under
``"lorakit_paged"`` (the host model's source is untouched). While a :class:`PagedBatch` is active
(``with paged_batch(...)``), each attention layer writes the step's new keys/values into their slots and
attends over the gathered context of every row with a per-row causal mask; outside one it is plain SDPA, so
``model.generate`` and ordinary forwards keep working on the same model.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LorakitError

ATTN_IMPLEMENTATION = "lorakit_paged"


class CacheFullError(LorakitError):
    """Raised by :meth:`PagedKVCache.allocate` when the free list has fewer blocks than asked for."""


class PagedKVCache:
    """Preallocated key/value blocks for every attention layer of one model.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry.
        num_blocks: blocks to preallocate (each holds ``block_size`` tokens of every layer).
        block_size: tokens per block.
    Memory: ``2 * num_layers * (num_blocks * block_size + 1) * num_kv_heads * head_dim * itemsize`` bytes (the
    one extra token slot is ``scratch_slot``), all allocated here, none later.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise LorakitError(f"a paged KV cache needs num_blocks >= 1 and block_size >= 1 "
                               f"(got {num_blocks}, {block_size}); raise the memory budget")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_slot = num_blocks * block_size  # in no block: padding rows of static-shape steps write here
        shape = (num_layers, num_blocks * block_size + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks  # holders of each block (>1: shared by forked sequences)

    @staticmethod
    def geometry(config) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of a transformers decoder config."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim

    @classmethod
    def from_budget(cls, config, memory_bytes: int, *, block_size: int = 16, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> "PagedKVCache":
        """As many blocks as ``memory_bytes`` holds, with the scratch token slot, for a model with this transformers
        ``config``: the cache allocates at most ``memory_bytes`` (:attr:`nbytes`, what a server reports, includes the
        scratch slot, so the budget bounds it too)."""
        layers, kv_heads, head_dim = cls.geometry(config)
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * layers * kv_heads * head_dim * itemsize  # one token slot: k and v of every layer
        per_block = per_token * block_size
        num_blocks = (int(memory_bytes) - per_token) // per_block
        if num_blocks < 1:
            raise LorakitError(f"KV cache budget {memory_bytes} bytes is below one block and the scratch token slot "
                               f"({per_block} + {per_token} bytes for block_size={block_size}); raise it")
        return cls(layers, kv_heads, head_dim, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                   device=device)

    # -- blocks ----------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, the scratch slot included (the Prometheus ``lorakit_kv_cache_bytes``
        and ``lorakit bench serve``'s memory column report this)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"KV cache has {len(self._free)} free blocks, {n} needed")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one hold on each block; a block nobody holds any more is free again."""
        for b in blocks:
            if self._refs[b] < 1:
                raise LorakitError(f"KV cache block {b} released more often than it was held (a bug in the caller)")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        """How many sequences hold ``block`` (0: free)."""
        return self._refs[block]

    def fork(self, table: Sequence[int], num_tokens: int, n: int) -> list[list[int]]:
        """``n`` block tables that hold the first ``num_tokens`` tokens of the sequence whose table is ``table`` (their
        keys and values written already), for ``n`` sequences that continue it on their own: its full blocks shared
        (held once more per table), its partly filled last block (when ``num_tokens`` is not a multiple of
        ``block_size``) copied into a fresh block per table, into which that sequence writes its next tokens.

        Uses ``n`` free blocks when the last block is partial, none otherwise; raises CacheFullError (nothing
        changed) when fewer are free. Raises LorakitError when ``table`` holds fewer than ``num_tokens`` tokens."""
        full, partial = divmod(num_tokens, self.block_size)
        if full + (partial > 0) > len(table):
            raise LorakitError(f"a table of {len(table)} blocks holds at most {len(table) * self.block_size} tokens, "
                               f"not {num_tokens}")
        fresh = self.allocate(n) if partial else []  # raises before any count changes
        for b in table[:full]:
            self._refs[b] += n
        if partial:
            self.copy_block(table[full], fresh)
        return [list(table[:full]) + fresh[i: i + 1] for i in range(n)]

    def copy_block(self, src: int, dsts: Sequence[int]) -> None:
        """Copy block ``src``'s keys and values (every layer) into each of blocks ``dsts``: one gather and one
        scatter per tensor, whatever the number of copies."""
        bs = self.block_size
        offsets = torch.arange(bs, device=self.k.device)
        dst = (torch.as_tensor(list(dsts), dtype=torch.long, device=self.k.device)[:, None] * bs + offsets).reshape(-1)
        src_slots = (src * bs + offsets).repeat(len(dsts))  # (copies * bs,)
        for t in (self.k, self.v):  # (layers, slots, kv_heads, head_dim)
            t.index_copy_(1, dst, t.index_select(1, src_slots))


def block_table(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """(rows, widest table) long: each row's block ids, zero-padded on the right (reads there are masked)."""
    table = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
    for i, t in enumerate(tables):  # the running requests' block lists (host ints), not adapters
        table[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    return table


@dataclass
class PagedBatch:
    """Where one forward's tokens go in the cache and what each of them may attend to.

    ``write_slots`` (batch, q): cache slot of each new token, -1 for right padding.
    ``read_slots`` (batch, ctx): cache slot of each context position (0 where past the row's length).
    ``mask`` (batch, 1, q, ctx): True where query token may attend context position (causal, own row only).
    ``dense``: every entry of ``write_slots`` is a slot (no -1): the keys are written with one ``index_copy_``, no
    boolean indexing (whose data-dependent shape reads the mask back to the host: a device synchronisation).
    """

    cache: PagedKVCache
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    mask: torch.Tensor
    dense: bool = False

    @classmethod
    def build(cls, cache: PagedKVCache, tables: Sequence[Sequence[int]], starts: Sequence[int],
              lengths: Sequence[int]) -> "PagedBatch":
        """Row i holds its tokens ``starts[i] .. starts[i] + lengths[i] - 1`` (positions), blocks ``tables[i]``."""
        bs = cache.block_size
        batch, q = len(tables), max(lengths)
        ctx = max(s + n for s, n in zip(starts, lengths))
        table = block_table(tables)
        start = torch.as_tensor(starts, dtype=torch.long)[:, None]
        length = torch.as_tensor(lengths, dtype=torch.long)[:, None]
        pos = torch.arange(ctx)  # (ctx,)
        slots = table[:, pos // bs] * bs + pos % bs  # (batch, ctx)
        read = torch.where(pos[None] < start + length, slots, torch.zeros_like(slots))
        j = torch.arange(q)[None]  # (1, q)
        valid_q = j < length  # (batch, q)
        write = torch.where(valid_q, slots.gather(1, (start + j).clamp(max=ctx - 1)), torch.full_like(j, -1))
        mask = pos[None, None, :] <= (start + j)[..., None]  # (batch, q, ctx) causal within the row
        mask = mask | ~valid_q[..., None]  # padded queries attend anywhere (output unused, avoids NaN rows)
        dev = cache.k.device  # built on the host (small integer work), used where the cache lives
        return cls(cache, write.to(dev, non_blocking=True), read.to(dev, non_blocking=True),
                   mask[:, None].to(dev, non_blocking=True), dense=all(n == q for n in lengths))


_BATCH: ContextVar[PagedBatch | None] = ContextVar("lorakit_paged_batch", default=None)


@contextlib.contextmanager
def paged_batch(batch: PagedBatch) -> Iterator[PagedBatch]:
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (b, heads, q, d), key/value (b, kv_heads, q, d) (rotary applied)
    -> (b, q, heads, d). Paged when a batch is active, SDPA otherwise."""
    batch = _BATCH.get()
    if batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cache, layer = batch.cache, module.layer_idx
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    if batch.dense:  # every row writes (static steps: padding rows into the scratch slot): no host read
        slots = batch.write_slots.reshape(-1)  # (b * q,)
        shape = (slots.shape[0], *k_layer.shape[1:])  # (b * q, kv_heads, d)
        k_layer.index_copy_(0, slots, key.transpose(1, 2).reshape(shape).to(k_layer.dtype))
        v_layer.index_copy_(0, slots, value.transpose(1, 2).reshape(shape).to(v_layer.dtype))
    else:
        valid = batch.write_slots >= 0  # (b, q)
        slots = batch.write_slots[valid]
        k_layer[slots] = key.transpose(1, 2)[valid].to(k_layer.dtype)  # (n, kv_heads, d)
        v_layer[slots] = value.transpose(1, 2)[valid].to(v_layer.dtype)
    k = k_layer[batch.read_slots].transpose(1, 2).to(query.dtype)  # (b, kv_heads, ctx, d)
    v = v_layer[batch.read_slots].transpose(1, 2).to(query.dtype)
    # grouped-query attention: SDPA shares each kv head across its query heads (no repeat_interleave copy of
    # the whole context per layer per step)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=batch.mask, scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_paged_attention(model: nn.Module) -> None:
    """Register the paged attention (and SDPA's mask builder for it) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
