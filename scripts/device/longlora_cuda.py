"""CUDA check of LongLoRA's S²-Attn (run on a GPU machine from the repo root: PYTHONPATH=src python3 ...):
step time and peak memory of S²-Attn vs full causal SDPA (forward + backward, bf16) at 4k and 16k tokens, and the
bf16 vs fp32 difference of S²-Attn. Not run yet: the task's device time went to the serving checks."""

import time

import torch
import torch.nn.functional as F

from lorakit.training.procedures.longlora import s2_attention_core


def main() -> None:
    for length in (4096, 16384):
        q, k, v = [torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3)]
        runs = {"s2": lambda: s2_attention_core(q, k, v, length // 4),
                "full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)}
        for name, fn in runs.items():
            fn().float().sum().backward()  # warm-up
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                fn().float().sum().backward()
            torch.cuda.synchronize()
            print(f"L={length} {name}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms/step, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        with torch.no_grad():
            diff = (s2_attention_core(q.float(), k.float(), v.float(), length // 4)
                    - s2_attention_core(q, k, v, length // 4).float()).abs().max().item()
        print(f"L={length} S²-Attn bf16 vs fp32 max |diff| {diff:.3e}")


if __name__ == "__main__":
    main()
