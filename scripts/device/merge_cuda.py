"""GPU check for lorakit's adapter merges: a merge of adapters living on a CUDA model equals the same merge on CPU.

Merges run their arithmetic on CPU in float32 whatever the model's device (``compose.merge._cpu32``), so the two
results must be equal to float rounding (the DoRA row scales are computed on the device, then moved), and
DARE / DELLA's seeded masks must be identical. Covers plain LoRA, rsLoRA, lora_bias, DoRA, and a MixLoRA collapse.

Run on the device machine from the repository root:

    PYTHONPATH=src python scripts/device/merge_cuda.py

`python scripts/device/merge_cuda.py cpu` runs the same cases CPU against CPU (a smoke test of the script).
Prints one line per case and exits non-zero on the first mismatch or error.
"""
from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.compose import collapse_experts, merge_adapters
from lorakit.methods.mixlora import MixLoraConfig

METHODS = [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 8}), ("ties", {"density": 0.5}),
           ("dare_linear", {"density": 0.5}), ("della", {"density": 0.5}), ("task_arithmetic", {}),
           ("magnitude_prune", {"density": 0.5}), ("lego", {"svd_rank": 4})]


def model_with(variant: dict, n: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256))
    for i in range(n):
        torch.manual_seed(100 + i)
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, **variant), f"a{i}")
    return model


def compare(label: str, cpu, gpu) -> bool:
    worst = 0.0
    for key, t in cpu.state_dict.items():
        g = gpu.state_dict[key]
        if g.device.type != "cpu":
            print(f"FAIL {label}: {key} returned on {g.device}")
            return False
        worst = max(worst, (t.float() - g.float()).abs().max().item())
    ok = worst <= 1e-4 and cpu.state_dict.keys() == gpu.state_dict.keys()
    print(f"{'ok  ' if ok else 'FAIL'} {label}: max |cpu - cuda| = {worst:.2e}")
    return ok


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    variants = [("plain", {}), ("rslora", {"use_rslora": True}), ("lora_bias", {"lora_bias": True}),
                ("dora", {"use_dora": True})]
    names = ["a0", "a1", "a2"]
    for vname, variant in variants:
        for method, opts in METHODS:
            if vname == "dora" and method not in ("linear", "cat", "svd", "task_arithmetic"):
                continue
            model = model_with(variant)
            try:
                cpu = merge_adapters(names, [0.5, 0.3, 0.2], method, model=model, **opts)
                gpu = merge_adapters(names, [0.5, 0.3, 0.2], method, model=model.to(device), **opts)
            except Exception as e:  # report which case broke, then stop
                print(f"FAIL {vname}/{method}: {type(e).__name__}: {e}")
                return 1
            if not compare(f"{vname}/{method}", cpu, gpu):
                return 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256))
    lk.add_adapter(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2), "mix")
    cpu = collapse_experts(model, "mix")
    gpu = collapse_experts(model.to(device), "mix")
    return 0 if compare("mixlora collapse", cpu, gpu) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
