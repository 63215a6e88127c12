"""CUDA check of LoRA on convolutions (run on a GPU machine from the repo root: PYTHONPATH=src:tests python3 ...):
a diffusers UNet2DModel (channels 64/128, 64×64 images, batch 16, r=16 on every Conv2d) in fp32 and bf16 —
lorakit vs PEFT outputs on the same weights (one adapter and a mixed batch of 4 adapters: lorakit's grouped
convolution + bmm vs PEFT's ``adapter_names`` loop), merged vs unmerged, and
``lorakit bench perf --only conv --device cuda`` for the timing ratios. Not run yet (the lead holds the device)."""

import copy
import subprocess
import sys

import peft
import torch
from diffusers import UNet2DModel

import lorakit as lk

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"]


def main() -> None:
    torch.manual_seed(0)
    base = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(64, 128), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).cuda().eval()
    x = torch.randn(16, 3, 64, 64, device="cuda")
    t = torch.randint(0, 1000, (16,), device="cuda")
    names = ["default", "a1", "a2", "a3"]
    for dtype in (torch.float32, torch.bfloat16):
        ours = copy.deepcopy(base).to(dtype)
        for n in names:
            lk.add_adapter(ours, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False),
                           name=n)
        theirs = peft.get_peft_model(copy.deepcopy(base).to(dtype), peft.LoraConfig(r=16, lora_alpha=32,
                                                                                     target_modules=TARGETS))
        peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours, "default"))
        for n in names[1:]:
            theirs.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
            peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours, n), adapter_name=n)
        theirs.set_adapter("default")
        theirs.eval()
        xs = x.to(dtype)
        rows = [names[i % 4] for i in range(16)]
        with torch.no_grad():
            one = (ours(xs, t).sample - theirs(xs, t).sample).abs().max().item()
            with lk.routing(adapter_names=rows):
                mixed_ours = ours(xs, t).sample
            mixed = (mixed_ours - theirs(xs, t, adapter_names=rows).sample).abs().max().item()
            unmerged = ours(xs, t).sample
            lk.merge_adapter(ours)
            merged = (ours(xs, t).sample - unmerged).abs().max().item()
        print(f"{dtype}: one adapter max|lorakit-peft| {one:.2e}; mixed batch {mixed:.2e}; merged-unmerged {merged:.2e}")
    subprocess.run([sys.executable, "-m", "lorakit", "bench", "perf", "--only", "conv", "--device", "cuda",
                    "--output", "/tmp/conv_bench_cuda"], check=True)


if __name__ == "__main__":
    main()
