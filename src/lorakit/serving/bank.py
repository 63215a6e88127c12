"""Adapter banks: many LoRA adapters of one layer stacked in a few tensors, applied to a mixed batch in one pass.

S-LoRA (Sheng et al., arXiv:2311.03285) and Punica (Chen et al., arXiv:2310.18547): the base GEMM runs once over
the whole batch, then every row adds its own adapter's ``s · B A x``:

    y[b] = base(x[b]) + Σ_j w[b, j] · s_{id[b,j]} · B_{id[b,j]} A_{id[b,j]} x[b]

Storage (one bank per adapted layer, slot 0 is an all-zero "no adapter" slot):

- ``A``: (slots, r_max, in) — each adapter's ``lora_A`` as saved by PEFT.
- ``B``: (slots, r_max, out) — ``lora_B`` transposed with the adapter's scaling folded in (α/r or α/√r).
- ``bias``: (slots, out) — only when some adapter has ``lora_bias``, scaled the same way.

Mixed ranks are zero-padded to ``r_max``; zero rows of A and B add exactly zero. Each forward only uses
the ranks it needs (``r_used`` = largest rank among the slots in the batch), so one r=64 adapter in the bank
does not slow batches of r=8 adapters. (Bucketing by rank would need one pass per bucket; padding costs at
most r_max/r and keeps a single pass — see ``bench/serving.py`` for the numbers.)

Execution (no Python loop over adapters; chosen per batch, cached per ids tensor):

- ``single``: the whole batch uses one adapter: two plain matmuls, no gather at all.
- ``grouped`` (SGMV on views): rows sorted by adapter in equal blocks whose adapters are consecutive bank slots
  (e.g. a batch built in load order): one ``bmm`` per step on views of the bank, no copies.
- ``rows`` (BGMV), every other batch: gather each row's A and B, shrink then expand with ``bmm``. At inference
  the gathers run over blocks of rows sized to stay in cache (``ROW_BLOCK_BYTES``), and the expand accumulates
  straight into the base output (``baddbmm_``) — no delta-sized temporary. Sorting rows into padded groups
  and back was measured slower on CPU than this, even with 32 rows per adapter.

Weighted combinations (``ids`` and weights of shape (batch, k)) concatenate the k gathered adapters along the
rank axis, so a row's mix is still one shrink and one expand.

GPU kernels: :func:`register_kernel` installs a fused kernel for a device type; the bank calls it instead of the
torch path for tensors on that device. :mod:`lorakit.serving.triton_bgmv` (Triton, Punica BGMV / S-LoRA MBGMV)
is registered for "cuda" when Triton and a CUDA device are present; nothing is registered for the CPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import LayerInfo, embedding_scaled
from ..core.errors import AdapterError
from ..core.routing import rows_for_batch

WEIGHTS_KEY = "adapter_weights"  # routing(adapter_ids=(batch, k), extras={WEIGHTS_KEY: (batch, k)})
# routing(adapter_ids=..., extras={STATIC_KEY: True}): a static-shape step that a CUDA graph may capture
# (``serving/graphs.py``). The ids are a (batch, k) long tensor already on the banks' device, range-checked by the
# caller on the host; every bank gathers its slots and runs the per-row plan at its full ``r_max`` with no host
# read and no cache, so the same code is recorded once and replayed with new ids and new bank contents.
STATIC_KEY = "static_step"

# Per-row path at inference: rows are processed in blocks whose gathered A and B take about this many bytes,
# so they are still in cache when the products read them (a loop over row blocks, never over adapters).
ROW_BLOCK_BYTES = 4 << 20


# -- kernel hook -------------------------------------------------------------------------------------------
class BankKernel(Protocol):
    """A fused multi-adapter LoRA kernel for one device type (e.g. a Triton BGMV/SGMV on "cuda").

    Called as ``kernel(x, A, B, slots, weights, r_used, ranks=ranks, out=out)`` with ``x`` (batch, tokens, in),
    ``A`` (slots, r_max, in), ``B`` (slots, r_max, out) (scaling folded in, slot 0 all zeros), ``slots`` (batch, k)
    local slot indices on the bank's device, ``weights`` (batch, k) or None (= all ones), ``ranks`` (slots,) each
    slot's own rank, and ``out`` None or a (batch, tokens, out) tensor to add the delta into in place. Returns the
    delta (batch, tokens, out) in ``x``'s dtype (``out`` itself when given), or None to fall back to the torch
    path (e.g. for shapes it does not handle). Bias is added by the bank.

    With a kernel registered for its device a bank skips the torch path's batch planning (which reads the slots
    back to the host): the kernel gets every mixed batch, with ``r_used`` = the bank's ``r_max``.
    :mod:`lorakit.serving.triton_bgmv` is the CUDA kernel, registered on import when Triton and CUDA are present.
    """

    def __call__(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                 weights: torch.Tensor | None, r_used: int, *, ranks: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor | None: ...


_KERNELS: dict[str, BankKernel] = {}
_KERNELS_VERSION = [0]  # bumped on every (un)registration: banks' cached plans name the kernel they chose
# Bumped whenever any bank's tensors are replaced (grown, moved) or a bank joins or leaves a layer: what a captured
# CUDA graph read by address is then stale, so graph runners drop their graphs when it changes (storage_epoch()).
_STORAGE_EPOCH = [0]


def storage_epoch() -> int:
    """A counter that changes whenever some bank's storage is reallocated or banks are added to / removed from
    layers; unchanged means every captured address is still valid (in-place writes of adapter weights are not
    counted: a replay reads them where they are)."""
    return _STORAGE_EPOCH[0] + _KERNELS_VERSION[0]


def bump_storage_epoch() -> None:
    _STORAGE_EPOCH[0] += 1


def register_kernel(device_type: str, kernel: BankKernel | None) -> None:
    """Use ``kernel`` for linear banks whose tensors live on ``device_type`` ("cuda", ...); None removes it."""
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel
    _KERNELS_VERSION[0] += 1


# -- execution plan ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """How one bank runs one batch; computed once per (ids tensor, bank layout) and cached."""

    mode: str  # "none" | "single" | "rows" | "grouped"
    slots: torch.Tensor  # (batch, k) local slots
    r_used: int
    slot: int = 0  # mode "single": the one slot
    group_view: tuple[int, int] = (0, 0)  # mode "grouped": (first slot, number of groups G)
    kernel: BankKernel | None = None  # the fused kernel that takes this batch (inference only), if any


def make_plan(slots: torch.Tensor, ranks: torch.Tensor, weighted: bool = False) -> Plan:
    """Choose none / single / grouped / rows for ``slots`` (batch, k); ``ranks`` (slots,) is each slot's rank.

    ``grouped`` (SGMV on views) is taken only when it needs no copy at all: rows sorted by slot, the slots a
    contiguous range, every slot the same number of rows — then block g of the batch meets bank slots
    ``first + g`` as plain views. Every other mixed batch runs per row (BGMV): measured on CPU, gathering each
    row's A and B block by block (in cache) beats permuting activations into padded groups and back, even at
    32 rows per adapter (bench/serving.py).
    """
    r_used = int(ranks[slots].max()) if slots.numel() else 0
    if r_used == 0:
        return Plan("none", slots, 0)
    if weighted or slots.shape[1] != 1:
        return Plan("rows", slots, r_used)
    flat = slots[:, 0]
    uniq, counts = torch.unique_consecutive(flat, return_counts=True)
    groups = uniq.numel()
    if groups == 1:
        return Plan("single", slots, r_used, slot=int(uniq[0]))
    if bool((uniq[1:] - uniq[:-1] == 1).all()) and bool((counts == counts[0]).all()):
        return Plan("grouped", slots, r_used, group_view=(int(uniq[0]), groups))
    return Plan("rows", slots, r_used)


# -- banks -------------------------------------------------------------------------------------------------
class LoraBank(nn.Module):
    """Every banked LoRA adapter of one linear layer (nn.Linear / Conv1D); set as ``AdapterLayer.bank``.

    Global adapter ids (shared by all layers of a model) map to local slots through ``table``; an adapter that
    does not adapt this layer maps to slot 0 and gets a zero delta here. Buffers are non-persistent: banks are
    rebuilt from adapter files, never saved with the model's state dict.
    """

    a_rank_dim = 1  # A is (slots, r_max, in)

    def __init__(self, info: LayerInfo, *, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.info = info
        a_shape = [1, 0, 0]
        a_shape[3 - self.a_rank_dim] = info.in_features
        self.register_buffer("A", torch.zeros(a_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(1, 0, info.out_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.register_buffer("ranks", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("table", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.used = 1  # slots in use (slot 0, the zero adapter, included); slots >= used are spare capacity
        self.free: list[int] = []
        # Plain dict, not module attributes: bumped on every write, and nn.Module.__setattr__ is slow.
        # "layout": content keys of ``table`` and ``ranks`` (computed at the first forward after a write), so that
        # banks with the same id -> slot table share one slot gather and one plan per forward.
        self._state: dict = {"version": 0, "cache": None, "layout": None}

    # -- storage -----------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    @property
    def r_max(self) -> int:
        return self.A.shape[self.a_rank_dim]

    @property
    def n_adapters(self) -> int:
        return self.used - 1 - len(self.free)

    def reserve(self, slots: int, r: int, max_slots: int | None = None) -> None:
        """Make room for ``slots`` more adapters of rank up to ``r``.

        Without ``max_slots`` the bank grows to exactly what is asked (a batch load sizes it once). With it (the
        most adapters this bank will ever hold, e.g. a store's ``max_loras``), a growing bank at least doubles,
        up to ``max_slots`` adapters + the zero slot: adapters loaded one at a time then cost O(log n) grows of
        the bank instead of one full copy of the bank per adapter (O(n²) bytes copied)."""
        need = self.used + max(0, slots - len(self.free))
        cap = max(self.capacity, need)
        if max_slots is not None and cap > self.capacity:
            cap = max(need, min(2 * self.capacity, max_slots + 1))
        self.reserve_capacity(cap - 1, max(self.r_max, r))

    def reserve_capacity(self, adapters: int, r: int) -> None:
        """Storage for ``adapters`` adapters in all (plus the zero slot) at rank up to ``r``, allocated now (no
        doubling; nothing shrinks). Static-shape steps reserve everything up front, so that loads made while CUDA
        graphs exist write into the storage the graphs read instead of reallocating it."""
        cap, r_max = max(self.capacity, adapters + 1), max(self.r_max, r)
        if cap == self.capacity and r_max == self.r_max:
            return
        self.A = _grown(self.A, cap, self.a_rank_dim, r_max)
        self.B = _grown(self.B, cap, 1, r_max)
        if self.bias is not None:
            self.bias = _grown(self.bias, cap)
        self.ranks = _grown(self.ranks, cap)
        self._touch(storage=True)

    def resize_table(self, n_ids: int) -> None:
        """Room in the id -> slot table for global ids 0 .. n_ids-1 (entry 0 is id -1, "no adapter")."""
        if self.table.numel() < n_ids + 1:
            table = self.table.new_zeros(n_ids + 1)
            table[: self.table.numel()] = self.table
            self.table = table
            self._touch(storage=True)

    def allocate(self, adapter_id: int) -> int:
        """A slot for global id ``adapter_id`` (its old slot if it has one); call ``reserve`` first."""
        table = self._buffers["table"]  # (buffers read once: nn.Module attribute reads are Python calls)
        slot = int(table[adapter_id + 1])
        if slot == 0:
            if self.free:
                slot = self.free.pop()
            else:
                if self.used >= self._buffers["A"].shape[0]:
                    raise RuntimeError("LoraBank.allocate without reserve")
                slot = self.used
                self.used += 1
            table[adapter_id + 1] = slot
            self._touch()
        return slot

    def write(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              lora_bias: torch.Tensor | None = None) -> None:
        """Store one adapter in ``slot``: ``lora_A`` and ``lora_B`` as PEFT saves them (A (r, in), B (out, r))."""
        r = lora_A.shape[0]
        buffers = self._buffers
        A, B, bias = buffers["A"], buffers["B"], buffers["bias"]
        r_max = A.shape[self.a_rank_dim]
        with torch.no_grad():
            self._write_A(slot, lora_A)
            B[slot, :r].copy_(lora_B.T).mul_(scaling)
            if r < r_max:  # rank padding (fresh slots are uninitialised, reused ones hold old values)
                A[slot].narrow(self.a_rank_dim - 1, r, r_max - r).zero_()
                B[slot, r:].zero_()
            if lora_bias is not None:
                if bias is None:
                    self.bias = bias = B.new_zeros(A.shape[0], self.info.out_features)
                    bump_storage_epoch()  # (a new tensor: a step captured without bias never adds it)
                bias[slot].copy_(lora_bias.float() * scaling)
            elif bias is not None:
                bias[slot].zero_()
        buffers["ranks"][slot] = r
        self._touch()

    def _write_A(self, slot: int, lora_A: torch.Tensor) -> None:
        self._buffers["A"][slot, : lora_A.shape[0]].copy_(lora_A)

    def release(self, adapter_id: int) -> None:
        """Forget global id ``adapter_id`` here; its slot is zeroed and reused by the next adapter."""
        buffers = self._buffers
        table = buffers["table"]
        if adapter_id + 1 >= table.numel():
            return
        slot = int(table[adapter_id + 1])
        if slot == 0:
            return
        with torch.no_grad():
            buffers["A"][slot].zero_()
            buffers["B"][slot].zero_()
            if buffers["bias"] is not None:
                buffers["bias"][slot].zero_()
        buffers["ranks"][slot] = 0
        table[adapter_id + 1] = 0
        self.free.append(slot)
        self._touch()

    def slot_of(self, adapter_id: int) -> int:
        return int(self.table[adapter_id + 1]) if adapter_id + 1 < self.table.numel() else 0

    def _apply(self, fn, recurse: bool = True):
        # ``.to(device)`` / ``.half()`` replace the buffers: cached plans hold slots on the old device
        out = super()._apply(fn, recurse)
        self._touch(storage=True)
        return out

    def _touch(self, storage: bool = False) -> None:
        if storage:
            bump_storage_epoch()
        self._state["version"] += 1
        self._state["cache"] = None
        self._state["layout"] = None

    def _layout(self) -> tuple:
        """What this bank's plans depend on, computed once per change of the bank (a load, release or move),
        never per forward: (table key, device type, n_ids, plan key with a fused kernel, plan key without).

        Equal table keys mean equal id -> slot tables on the same device: the contents are compared by 128-bit
        BLAKE2 digests (of ``ranks`` too), read to the host here."""
        table_t, A = self.table, self.A
        table = table_t.cpu().numpy().tobytes()
        table_key = (table_t.device, len(table), _digest(table))
        r_max = A.shape[self.a_rank_dim]
        layout = (table_key, A.device.type, table_t.numel() - 1, (table_key, r_max),
                  (table_key, _digest(self.ranks.cpu().numpy().tobytes())))
        self._state["layout"] = layout
        return layout

    # -- forward -----------------------------------------------------------------------------------------
    def _plan(self, ctx, batch: int, tokens: int) -> tuple[Plan, torch.Tensor | None]:
        """This bank's plan for the routing in force and the rows' weights (batch, k) or None.

        Host work per bank per forward is what bounds a small model on a GPU, so the common case is a few
        identity checks: the bank's own cache hits while the same ids tensor is routed (e.g. ``generate``'s
        steps), and otherwise the forward's shared routing entry (ids checked and moved once, see
        :func:`_routing_rows`) holds the slots and the plan of every distinct (table, ranks, kernel) layout, so
        only the first bank of each layout gathers its slots and plans (banks loaded together share a layout)."""
        ids = ctx.adapter_ids
        extras = ctx.extras
        weights = extras.get(WEIGHTS_KEY) if extras else None
        if extras and extras.get(STATIC_KEY):
            return self._static_plan(ids), weights
        state = self._state
        cache = state["cache"]
        grad = torch.is_grad_enabled()  # (fused kernels have no backward: they are planned only without autograd)
        if (cache is not None and cache[0] is ids and cache[2] is weights and cache[3] == batch
                and cache[4] == tokens and cache[5] == _KERNELS_VERSION[0] and cache[8] == grad
                and cache[1] == _version_of(ids)):
            return cache[6], cache[7]
        version = state["version"]
        layout = state["layout"] or self._layout()
        buffers = self._buffers
        table, A = buffers["table"], buffers["A"]
        rows = _routing_rows(ids, weights, batch, layout[2], layout[0][0], A.dtype)
        w = rows.w
        kernel = None if grad else _KERNELS.get(layout[1])
        plan_key = (kernel, layout[3]) if kernel is not None else (None, layout[4], w is not None)
        plan = rows.plans.get(plan_key)
        if plan is None:
            table_key = layout[0]
            slots = rows.slots.get(table_key)
            if slots is None:
                slots = rows.slots[table_key] = table[rows.ids_t + 1]  # (batch, k)
            if kernel is not None:  # the fused kernel takes every batch: no host read of the slots
                r_max = A.shape[self.a_rank_dim]
                plan = Plan("rows", slots, r_max, kernel=kernel) if r_max else Plan("none", slots, 0)
            else:
                plan = make_plan(slots, buffers["ranks"], weighted=w is not None)
            rows.plans[plan_key] = plan
        if state["version"] == version:  # (a write on another thread meanwhile: do not cache)
            state["cache"] = (ids, _version_of(ids), weights, batch, tokens, _KERNELS_VERSION[0], plan, w, grad)
        return plan, w

    def _static_plan(self, ids: torch.Tensor) -> Plan:
        """The plan of a static-shape step (``STATIC_KEY``): ``ids`` (batch, k) long on this bank's device, checked
        by the caller. Per-row at the full ``r_max`` (padded ranks add exact zeros), slots gathered on the device:
        no host read, no data-dependent shape, nothing cached across calls (a capture records the gather)."""
        buffers = self._buffers
        slots = buffers["table"][ids + 1]  # (batch, k)
        A = buffers["A"]
        r_max = A.shape[self.a_rank_dim]
        if not r_max:
            return Plan("none", slots, 0)
        return Plan("rows", slots, r_max, kernel=None if torch.is_grad_enabled() else _KERNELS.get(A.device.type))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])  # (batch, tokens, in): prefill (b, t, in), decode (b, 1, in)
        plan, w = self._plan(ctx, batch, x3.shape[1])
        if plan.mode == "none":
            return base_out.new_zeros(())
        x3 = x3.to(self.A.dtype)
        y = self._kernel(x3, plan, w)
        if y is None:
            y = self._delta(x3, plan, w)
        if self.bias is not None:
            self._add_bias(y, plan, w)
        return y.reshape(base_out.shape).to(base_out.dtype)

    def add_into(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        """Inference only: add the banked delta into the freshly computed base output in place.

        The expand runs as ``baddbmm_`` / ``addmm_`` straight into ``base_out``: no delta-sized tensor is
        allocated, written and re-read (on CPU that round trip cost as much as the LoRA products themselves)."""
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])
        tokens = x3.shape[1]
        plan, w = self._plan(ctx, batch, tokens)
        if plan.mode == "none":
            return base_out
        buffers = self._buffers  # (read once: each nn.Module attribute read of a buffer is a Python call)
        dtype = buffers["A"].dtype
        if x3.dtype != dtype:
            x3 = x3.to(dtype)
        kernel = plan.kernel  # chosen without autograd, as add_into always runs
        has_bias = buffers["bias"] is not None
        if base_out.dtype == dtype and base_out.is_contiguous():
            out = base_out.view(batch, tokens, -1)
            y = None if kernel is None else kernel(x3, buffers["A"], buffers["B"], plan.slots, w, plan.r_used,
                                                   ranks=buffers["ranks"], out=out)
            if y is None:
                y = self._delta(x3, plan, w, out=out)
            if has_bias:
                self._add_bias(y, plan, w)
            return base_out
        y = self._kernel(x3, plan, w)
        if y is None:
            y = self._delta(x3, plan, w)
        if has_bias:
            self._add_bias(y, plan, w)
        return base_out.add_(y.reshape(base_out.shape))

    def _kernel(self, x3: torch.Tensor, plan: Plan, w: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
        kernel = _KERNELS.get(x3.device.type)
        if kernel is None or (x3.requires_grad and torch.is_grad_enabled()):  # fused kernels have no backward
            return None
        return kernel(x3, self.A, self.B, plan.slots, w, plan.r_used, ranks=self.ranks, out=out)

    def _add_bias(self, y: torch.Tensor, plan: Plan, w: torch.Tensor | None) -> None:
        """Add the rows' (weighted) adapter biases into ``y`` (batch, tokens, out) in place (callers check that
        the bank has biases)."""
        b = self.bias[plan.slots]  # (batch, k, out)
        b = (b * w[..., None]).sum(1) if w is not None else b.sum(1)
        y.add_(b[:, None, :].to(y.dtype))

    def _shrink(self, x3: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, in) x (batch, r, in) -> (batch, tokens, r)."""
        return torch.bmm(x3, A.transpose(1, 2))

    def _delta(self, x3: torch.Tensor, plan: Plan, w: torch.Tensor | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The delta (batch, tokens, out) — or, with ``out`` given, the delta added into ``out`` in place."""
        ru = plan.r_used
        A, B = self.A[:, :ru], self.B[:, :ru]
        batch, tokens = x3.shape[0], x3.shape[1]
        if plan.mode == "single":
            h = self._shrink(x3.reshape(1, batch * tokens, -1), A[plan.slot: plan.slot + 1])[0]  # (b*t, r)
            if out is None:
                return (h @ B[plan.slot]).view(batch, tokens, -1)
            out.view(batch * tokens, -1).addmm_(h, B[plan.slot])
            return out
        if plan.mode == "grouped":  # block g of the batch uses bank slot first + g: views, no copies
            first, groups = plan.group_view
            h = self._shrink(x3.reshape(groups, -1, x3.shape[-1]), A[first: first + groups])  # (G, M*t, r)
            if out is None:
                return torch.bmm(h, B[first: first + groups]).view(batch, tokens, -1)
            out.view(groups, h.shape[1], -1).baddbmm_(h, B[first: first + groups])
            return out
        if out is None:
            return self._rows(x3, plan.slots, w, A, B)
        # Cache blocking: gather and apply the adapters of a block of rows at a time, so the gathered weights
        # are still in cache when the products read them (a loop over row blocks, not over adapters).
        k = plan.slots.shape[1]
        per_row = k * ru * (A.shape[-1] + B.shape[-1]) * A.element_size()
        step = max(1, ROW_BLOCK_BYTES // max(per_row, 1))
        for s in range(0, batch, step):
            e = min(batch, s + step)
            out[s:e].baddbmm_(self._rows_h(x3[s:e], plan.slots[s:e], None if w is None else w[s:e], A),
                              B.index_select(0, plan.slots[s:e].reshape(-1)).view(e - s, k * ru, -1))
        return out

    def _rows_h(self, x3: torch.Tensor, slots: torch.Tensor, w: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
        """Per-row shrink (BGMV): each row's k adapters concatenated along the rank axis -> (b, t, k*r)."""
        batch, k, ru = x3.shape[0], slots.shape[1], A.shape[self.a_rank_dim]
        Ag = A.index_select(0, slots.reshape(-1)).view(batch, k * ru, -1)  # (b, k*r, in)
        h = self._shrink(x3, Ag)
        if w is not None:
            h = (h.view(batch, -1, k, ru) * w.view(batch, 1, k, 1)).view(batch, -1, k * ru)
        return h

    def _rows(self, x3, slots, w, A, B) -> torch.Tensor:
        batch, k = slots.shape
        Bg = B.index_select(0, slots.reshape(-1)).view(batch, k * B.shape[1], -1)  # (b, k*r, out)
        return torch.bmm(self._rows_h(x3, slots, w, A), Bg)


class LoraEmbeddingBank(LoraBank):
    """Banked LoRA on nn.Embedding: ``A`` stored as (slots, num_embeddings, r_max) so the shrink is a lookup
    of row (slot, token id); the expand is the same as for linear layers. Always runs per row (gathers)."""

    a_rank_dim = 2  # A is (slots, num_embeddings, r_max)

    def __init__(self, info: LayerInfo, base_layer: nn.Embedding, *, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        if base_layer.max_norm is not None:
            raise AdapterError("banked embedding LoRA does not support nn.Embedding(max_norm=...) bases "
                               "(the lookup would renormalise the base table); exclude the embedding from target_modules")
        super().__init__(info, dtype=dtype, device=device)
        self.embed_scale = getattr(base_layer, "embed_scale", None)
        self.embed_weight_dtype = base_layer.weight.dtype  # a float scale is rounded to it, as in LoraEmbedding

    def add_into(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        y = self.forward(x, base_out, ctx)
        return base_out if y.dim() == 0 else base_out.add_(y)

    def _write_A(self, slot: int, lora_A: torch.Tensor) -> None:  # lora_embedding_A: (r, num_embeddings)
        self.A[slot, :, : lora_A.shape[0]].copy_(lora_A.T)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        batch = x.shape[0]
        ids = x.reshape(batch, -1)  # (batch, tokens) token ids
        plan, w = self._plan(ctx, batch, ids.shape[1])
        if plan.mode == "none":
            return base_out.new_zeros(())
        ru, k, vocab = plan.r_used, plan.slots.shape[1], self.info.in_features
        rows = plan.slots[:, None, :] * vocab + ids[:, :, None]  # (batch, tokens, k) rows of (slot, token)
        h = F.embedding(rows, self.A.view(-1, self.r_max))[..., :ru]  # (batch, tokens, k, r)
        if w is not None:
            h = h * w.view(batch, 1, k, 1)
        Bg = self.B[:, :ru].index_select(0, plan.slots.reshape(-1)).view(batch, k * ru, -1)
        y = torch.bmm(h.reshape(batch, ids.shape[1], k * ru), Bg)
        y = embedding_scaled(y, self.embed_scale, self.embed_weight_dtype)
        return y.reshape(base_out.shape).to(base_out.dtype)


def bank_for(layer: nn.Module, *, dtype: torch.dtype | None = None) -> LoraBank:
    """A new, empty bank matching ``layer`` (an AdapterLayer); dtype defaults to the base weight's."""
    base = layer.base_layer
    weight = base.weight
    dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    if layer.info.kind == "embedding":
        return LoraEmbeddingBank(layer.info, base, dtype=dtype, device=weight.device)
    if layer.info.kind == "linear":
        return LoraBank(layer.info, dtype=dtype, device=weight.device)
    raise AdapterError(f"no bank for layer kind {layer.info.kind!r}")



def _grown(t: torch.Tensor, cap: int, rank_dim: int | None = None, r_max: int = 0) -> torch.Tensor:
    """``t`` grown to ``cap`` slots (dim 0) and, if given, ``r_max`` along ``rank_dim``; the old slots' new rank
    columns are zeroed. New slots are left uninitialised (each is fully written, padding included, when
    allocated) — zero-filling gigabytes of banks up front would double the loading time."""
    shape = list(t.shape)
    shape[0] = cap
    if rank_dim is not None:
        shape[rank_dim] = r_max
    new = t.new_empty(shape)
    old = new[tuple(slice(0, n) for n in t.shape)]
    old.copy_(t)
    if rank_dim is not None and r_max > t.shape[rank_dim]:
        new[: t.shape[0]].narrow(rank_dim, t.shape[rank_dim], r_max - t.shape[rank_dim]).zero_()
    if rank_dim is None:
        new[t.shape[0]:].zero_()  # small per-slot vectors (ranks, bias): keep them zero
    return new


def _version_of(t) -> int | None:
    # inference tensors have no version counter (and asking raises: an exception per bank per forward was slow)
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return None
    return t._version


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class _Rows:
    """The checked routing of one forward on one device, shared by every bank: ``ids_t`` (batch, k) long,
    ``w`` (batch, k) or None, and, filled by the banks as they run, the slot gather of each distinct id -> slot
    table (``slots``: table key -> (batch, k)) and the plan of each distinct bank layout (``plans``)."""

    __slots__ = ("ids_t", "w", "slots", "plans")

    def __init__(self, ids_t: torch.Tensor, w: torch.Tensor | None):
        self.ids_t, self.w = ids_t, w
        self.slots: dict = {}
        self.plans: dict = {}


# The checked routing in force, on one device: every bank of a forward sees the same ``ids`` object, so the first
# bank checks and moves it and the others reuse it (one entry; it holds ``ids`` and ``weights`` so their
# identities cannot be reused while cached).
_ROWS_CACHE: dict = {"entry": None}  # entry = (key, ids, weights, _Rows), replaced whole (thread-safe reads)


def _routing_rows(ids, weights, batch: int, n_ids: int, device: torch.device, dtype: torch.dtype) -> _Rows:
    """Routing ids as a checked (batch, k) long tensor on ``device`` and weights (batch, k) or None.

    Raises:
        AdapterError: ids not integers, of the wrong shape, or outside -1 .. n_ids-1; weights of the wrong shape.
    """
    entry = _ROWS_CACHE["entry"]
    if entry is not None and entry[1] is ids and entry[2] is weights:
        key = entry[0]
        if (key[4] == batch and key[5] == n_ids and key[6] == device and key[7] == dtype
                and key[1] == _version_of(ids) and key[3] == _version_of(weights)):
            return entry[3]
    key = (id(ids), _version_of(ids), id(weights), _version_of(weights), batch, n_ids, device, dtype)
    ids_t = torch.as_tensor(ids)
    if ids_t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise AdapterError(f"routing adapter_ids must be an integer tensor, got dtype {ids_t.dtype}")
    ids_t = ids_t.long()
    if ids_t.dim() == 1:
        ids_t = ids_t[:, None]
    if ids_t.dim() != 2:
        raise AdapterError(f"routing adapter_ids must have shape (batch,) or (batch, k), got {tuple(ids_t.shape)}")
    ids_t = rows_for_batch(ids_t, batch, "adapter_ids")  # generate's beams / return sequences keep their row's
    # checked where the ids are (host ids: no device synchronisation), then moved to the bank's device
    if ids_t.numel() and (int(ids_t.min()) < -1 or int(ids_t.max()) >= n_ids):
        raise AdapterError(
            f"routing adapter_ids out of range [{int(ids_t.min())}, {int(ids_t.max())}]: this bank knows ids -1 "
            f"(no adapter) .. {n_ids - 1}. Use the AdapterRegistry's ids (registry.ids(names)).")
    ids_t = ids_t.to(device, non_blocking=True)
    w = None
    if weights is not None:
        w = torch.as_tensor(weights).to(device=device, dtype=dtype)
        if w.dim() == 1:
            w = w[:, None]
        if w.shape[1] != ids_t.shape[1]:
            raise AdapterError(f"extras[{WEIGHTS_KEY!r}] has shape {tuple(w.shape)}; adapter_ids has "
                               f"{tuple(ids_t.shape)} (one weight per id)")
        w = rows_for_batch(w, batch, f"extras[{WEIGHTS_KEY!r}]")
    rows = _Rows(ids_t, w)
    _ROWS_CACHE["entry"] = (key, ids, weights, rows)
    return rows
