"""The Triton BGMV kernel (lorakit.serving.triton_bgmv) against the Punica / S-LoRA per-row LoRA equations.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: the same kernel
source, executed op by op. With CUDA the same checks run compiled on the device (fp32 and bf16).

Reference (Punica, arXiv:2310.18547, §4 "BGMV"; S-LoRA, arXiv:2311.03285, §5.1 "MBGMV" for mixed ranks), written
directly from the equations, with no use of the bank code:

    y[b, t, :] = Σ_j w[b, j] · (x[b, t, :] @ A[s_bj, :rank(s_bj), :]ᵀ) @ B[s_bj, :rank(s_bj), :]
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import lorakit as lk  # noqa: E402
from lk_models import tiny_llama  # noqa: E402
from lorakit.serving import bank_routing, load_adapters, register_kernel  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def bgmv():
    """The kernel module: compiled on CUDA machines, else run by Triton's interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is imported when there is no CUDA)."""
    from lorakit.serving import triton_bgmv
    return triton_bgmv


DEVICE = "cuda" if CUDA else "cpu"


def _bank(slots: int, r_max: int, d_in: int, d_out: int, ranks: list[int], dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, r_max, d_in, generator=g) * 0.3
    B = torch.randn(slots, r_max, d_out, generator=g) * 0.3
    for s, r in enumerate(ranks):  # zero padding beyond each slot's rank, slot 0 = no adapter
        A[s, r:] = 0
        B[s, r:] = 0
    rk = torch.tensor(ranks)
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype), rk.to(DEVICE)


def _reference(x, A, B, slots, w, ranks):
    """The per-row equation, in float64, one (row, adapter) pair at a time."""
    x64, A64, B64 = x.double().cpu(), A.double().cpu(), B.double().cpu()
    y = torch.zeros(x.shape[0], x.shape[1], B.shape[2], dtype=torch.float64)
    for b in range(x.shape[0]):
        for j in range(slots.shape[1]):
            s = int(slots[b, j])
            r = int(ranks[s])
            wt = 1.0 if w is None else float(w[b, j])
            y[b] += wt * (x64[b] @ A64[s, :r].T) @ B64[s, :r]
    return y


@pytest.mark.parametrize("tokens,k,weighted", [(1, 1, False), (5, 1, False), (37, 1, False), (3, 2, True),
                                               (1, 3, True)])
def test_kernel_equals_per_row_equation(bgmv, tokens, k, weighted):
    ranks = [0, 8, 2, 16, 5]
    A, B, rk = _bank(5, 16, 40, 72, ranks, torch.float32)
    g = torch.Generator().manual_seed(1)
    batch = 6
    x = torch.randn(batch, tokens, 40, generator=g).to(DEVICE)
    slots = torch.randint(0, 5, (batch, k), generator=g).to(DEVICE)
    slots[0] = 0  # a row with no adapter
    w = torch.rand(batch, k, generator=g).to(DEVICE) if weighted else None
    y = bgmv.lora_bgmv(x, A, B, slots, w, 16, ranks=rk)
    torch.testing.assert_close(y.double().cpu(), _reference(x, A, B, slots, w, rk), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(y[0]) == 0


def test_kernel_accumulates_into_out_and_respects_r_used(bgmv):
    ranks = [0, 4, 4]
    A, B, rk = _bank(3, 12, 24, 20, ranks, torch.float32, seed=3)  # r_max 12, every adapter rank 4
    x = torch.randn(4, 2, 24).to(DEVICE)
    slots = torch.tensor([[1], [2], [0], [1]], device=DEVICE)
    base = torch.randn(4, 2, 20).to(DEVICE)
    out = base.clone()
    got = bgmv.lora_bgmv(x, A, B, slots, None, 4, out=out)  # r_used 4 < r_max, no per-slot ranks
    assert got is out
    expected = base.double().cpu() + _reference(x, A, B, slots, None, rk)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_mismatched_inputs_by_name(bgmv):
    A, B, _ = _bank(2, 4, 8, 8, [0, 4], torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        bgmv.lora_bgmv(torch.randn(2, 1, 9, device=DEVICE), A, B, torch.zeros(2, 1, dtype=torch.long, device=DEVICE),
                       None, 4)
    with pytest.raises(ValueError, match="dtype"):
        bgmv.lora_bgmv(torch.randn(2, 1, 8, device=DEVICE, dtype=torch.float64), A, B,
                       torch.zeros(2, 1, dtype=torch.long, device=DEVICE), None, 4)


@pytest.mark.skipif(not CUDA, reason="bf16 tensor-core path needs CUDA")
def test_kernel_bf16_close_to_equation(bgmv):
    ranks = [0, 16, 8, 64]
    A, B, rk = _bank(4, 64, 256, 512, ranks, torch.bfloat16)
    x = torch.randn(8, 33, 256, device=DEVICE, dtype=torch.bfloat16)
    slots = torch.tensor([[1], [2], [3], [0], [3], [2], [1], [1]], device=DEVICE)
    y = bgmv.lora_bgmv(x, A, B, slots, None, 64, ranks=rk)
    ref = _reference(x, A, B, slots, None, rk)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_model_with_kernel_equals_torch_path(bgmv, tmp_path, sh):
    """The whole served model with the kernel installed for its device equals the torch bank path."""
    dirs = {n: sh.make_adapter(tmp_path / n, seed, **cfg) for seed, (n, cfg) in enumerate(
        {"r2": dict(r=2, lora_alpha=4), "r8": dict(r=8, lora_alpha=3), "bias": dict(r=4, lora_alpha=8, lora_bias=True),
         "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}.items())}
    served = tiny_llama().to(DEVICE)
    load_adapters(served, dirs)
    ids = torch.randint(0, 96, (5, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rows = ["r8", None, "r2", "bias", "qv"]
    before = lk.serving.bank._KERNELS.get(DEVICE)
    with torch.no_grad():
        register_kernel(DEVICE, None)
        with bank_routing(served, rows):
            expected = served(input_ids=ids).logits
        register_kernel(DEVICE, bgmv.lora_bgmv)
        try:
            with bank_routing(served, rows):
                got = served(input_ids=ids).logits
            with bank_routing(served, [{"r8": 0.7, "qv": 0.3}] * 5):
                mixed = served(input_ids=ids).logits
        finally:
            register_kernel(DEVICE, before)
        with bank_routing(served, [{"r8": 0.7, "qv": 0.3}] * 5):
            mixed_expected = served(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed, mixed_expected, rtol=1e-4, atol=1e-4)


def test_kernel_is_skipped_when_gradients_flow(bgmv, tmp_path, sh):
    """The fused kernel has no backward: under autograd the bank takes the torch path, so gradients still reach
    the activations (and the output equals the no-grad kernel run)."""
    served = tiny_llama().to(DEVICE)
    load_adapters(served, {"r8": sh.make_adapter(tmp_path / "r8", 0, r=8, lora_alpha=3)})
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = []

    def recording(*args, **kw):
        calls.append(1)
        return bgmv.lora_bgmv(*args, **kw)

    before = lk.serving.bank._KERNELS.get(DEVICE)
    register_kernel(DEVICE, recording)
    try:
        with bank_routing(served, ["r8", None]):
            with_grad = served(input_ids=ids).logits
            assert not calls and with_grad.requires_grad
            with torch.no_grad():
                fused = served(input_ids=ids).logits
            assert calls
    finally:
        register_kernel(DEVICE, before)
    with_grad.sum().backward()
    assert served.model.embed_tokens.weight.grad is not None
    torch.testing.assert_close(fused, with_grad.detach(), rtol=1e-4, atol=1e-4)
