"""Fused multi-adapter LoRA for CUDA banks: a Triton shrink/expand pair (Punica BGMV / S-LoRA MBGMV style).

Punica (Chen et al., arXiv:2310.18547, "SGMV"/"BGMV") and S-LoRA (Sheng et al., arXiv:2311.03285, "MBGMV" for
mixed ranks) apply a different adapter to every row of a batch with two kernels over the whole batch:

    shrink:  h[b, t, j·R + i] = w[b, j] · Σ_c x[b, t, c] · A[slot[b, j], i, c]          (b, t, k·R), fp32
    expand:  y[b, t, o]      = Σ_j Σ_{i < rank(slot[b, j])} h[b, t, j·R + i] · B[slot[b, j], i, o]

``A`` is (slots, r_max, in) and ``B`` (slots, r_max, out) with the scaling folded in, exactly as
:class:`lorakit.serving.bank.LoraBank` stores them; ``R`` is the rank the batch needs (``r_used``). Each program
reads its row's slot from ``slots`` on the device, so no host synchronisation and no gather copies are needed,
and the expand loops only over the slot's own rank (S-LoRA's MBGMV: a rank-8 row does not pay for a rank-64
neighbour). With ``out`` given the expand adds into it in place (the base layer's output), so no delta-sized
tensor is written and re-read.

Numerics: products accumulate in fp32; for fp32 inputs the dots run in IEEE fp32 (no TF32), so the result
matches the torch path to fp32 rounding; for bf16/fp16 the shrink output is rounded to the input dtype before
the expand, as the torch path's ``bmm`` does.

The kernels run wherever Triton runs: on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, used by the tests on machines without a GPU). :func:`register` installs
:func:`lora_bgmv` as the bank kernel for ``"cuda"``; :mod:`lorakit.serving` calls it on import when CUDA and
Triton are both available (``LORAKIT_TRITON=0`` turns that off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, w_ptr, ranks_ptr, h_ptr,
                   T, IN, K, R,
                   sx_b, sx_t, sx_c, sa_s, sa_r, sa_c, ss_b, ss_k, sw_b, sw_k, sh_b, sh_t,
                   HAS_W: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // K
    j = pid_bk % K
    slot = tl.load(slots_ptr + b * ss_b + j * ss_k)
    rank = tl.load(ranks_ptr + slot)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    if rank > 0:
        x_rows = x_ptr + b * sx_b + offs_t[:, None] * sx_t
        a_cols = a_ptr + slot * sa_s + offs_r[None, :] * sa_r
        for c0 in range(0, IN, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            xt = tl.load(x_rows + offs_c[None, :] * sx_c, mask=(offs_t[:, None] < T) & (offs_c[None, :] < IN), other=0.0)
            at = tl.load(a_cols + offs_c[:, None] * sa_c, mask=(offs_r[None, :] < rank) & (offs_c[:, None] < IN),
                         other=0.0)
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        if HAS_W:
            acc = acc * tl.load(w_ptr + b * sw_b + j * sw_k).to(tl.float32)
    h_ptrs = h_ptr + b * sh_b + offs_t[:, None] * sh_t + j * R + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=(offs_t[:, None] < T) & (offs_r[None, :] < R))


@triton.jit
def _expand_kernel(h_ptr, b_ptr, slots_ptr, ranks_ptr, y_ptr,
                   T, OUT, K, R,
                   sh_b, sh_t, sb_s, sb_r, sb_o, ss_b, ss_k, sy_b, sy_t, sy_o,
                   ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, ROUND_H: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for j in range(0, K):
        slot = tl.load(slots_ptr + b * ss_b + j * ss_k)
        rank = tl.load(ranks_ptr + slot)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ht = tl.load(h_ptr + b * sh_b + offs_t[:, None] * sh_t + j * R + offs_r[None, :],
                         mask=(offs_t[:, None] < T) & (offs_r[None, :] < rank), other=0.0)
            bt = tl.load(b_ptr + slot * sb_s + offs_r[:, None] * sb_r + offs_o[None, :] * sb_o,
                         mask=(offs_r[:, None] < rank) & (offs_o[None, :] < OUT), other=0.0)
            if ROUND_H:  # bf16 / fp16 banks: the shrink result rounded to the bank dtype, as torch's bmm does
                ht = ht.to(bt.dtype)
            else:
                bt = bt.to(tl.float32)
            if IEEE:
                acc += tl.dot(ht, bt, input_precision="ieee")
            else:
                acc += tl.dot(ht, bt)
    y_ptrs = y_ptr + b * sy_b + offs_t[:, None] * sy_t + offs_o[None, :] * sy_o
    mask = (offs_t[:, None] < T) & (offs_o[None, :] < OUT)
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, low: int) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def lora_bgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None,
              r_used: int, *, ranks: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row multi-adapter LoRA delta, fused (see the module docstring for the formulas).

    Args:
        x: (batch, tokens, in) activations, in the bank's dtype (fp32, bf16 or fp16).
        A: (slots, r_max, in) bank ``A``; B: (slots, r_max, out) bank ``B`` (scaling folded in).
        slots: (batch, k) integer bank slots per row (slot 0 = no adapter).
        weights: (batch, k) mixture weights, or None for all ones.
        r_used: ranks 0 .. r_used-1 are read (``r_used`` <= r_max).
        ranks: (slots,) each slot's own rank; rows beyond it are skipped. None = ``r_used`` for every slot.
        out: (batch, tokens, out) tensor to add the delta into in place; None returns a new tensor.

    Returns:
        The delta (or ``out`` with the delta added), (batch, tokens, out) in ``x``'s dtype (``out``'s if given).

    Raises:
        ValueError: on mismatched shapes, devices or dtypes (named in the message).
    """
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3 or slots.dim() != 2:
        raise ValueError(f"lora_bgmv wants x (batch, tokens, in), A/B (slots, r, in/out), slots (batch, k); got "
                         f"x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, slots {tuple(slots.shape)}")
    batch, tokens, d_in = x.shape
    k = slots.shape[1]
    if A.shape[2] != d_in or A.shape[:2] != B.shape[:2] or slots.shape[0] != batch or not 0 < r_used <= A.shape[1]:
        raise ValueError(f"lora_bgmv: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, slots "
                         f"{tuple(slots.shape)}, r_used {r_used} do not fit together")
    if x.dtype != A.dtype or B.dtype != A.dtype:
        raise ValueError(f"lora_bgmv: x ({x.dtype}), A ({A.dtype}) and B ({B.dtype}) must share one dtype")
    d_out = B.shape[2]
    if ranks is None:
        ranks = torch.full((A.shape[0],), r_used, dtype=torch.int32, device=A.device)
        ranks[0] = 0
    elif r_used < A.shape[1]:
        ranks = ranks.clamp(max=r_used)
    if out is None:
        y, accumulate = torch.empty(batch, tokens, d_out, dtype=x.dtype, device=x.device), False
    else:
        if out.shape != (batch, tokens, d_out):
            raise ValueError(f"lora_bgmv: out has shape {tuple(out.shape)}, expected {(batch, tokens, d_out)}")
        y, accumulate = out, True
    if batch == 0 or tokens == 0:
        return y if accumulate else y.zero_()
    h = torch.empty(batch, tokens, k * r_used, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    block_t = _pow2(min(tokens, 64), 16)
    block_r = _pow2(r_used, 16)
    w = weights if weights is not None else slots  # any tensor; unused without HAS_W
    _shrink_kernel[(triton.cdiv(tokens, block_t), batch * k)](
        x, A, slots, w, ranks, h, tokens, d_in, k, r_used,
        x.stride(0), x.stride(1), x.stride(2), A.stride(0), A.stride(1), A.stride(2),
        slots.stride(0), slots.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1),
        HAS_W=weights is not None, IEEE=ieee, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_C=64 if block_r <= 32 else 32)
    block_o = 64 if d_out <= 2048 or tokens > 16 else 128
    _expand_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(d_out, block_o), batch)](
        h, B, slots, ranks, y, tokens, d_out, k, r_used,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), slots.stride(0), slots.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        ACCUMULATE=accumulate, IEEE=ieee, ROUND_H=not ieee, BLOCK_T=block_t, BLOCK_R=min(block_r, 32),
        BLOCK_O=block_o)
    return y


def register(device_type: str = "cuda") -> None:
    """Install :func:`lora_bgmv` as the bank kernel for ``device_type`` (see ``bank.register_kernel``)."""
    from .bank import register_kernel
    register_kernel(device_type, lora_bgmv)
