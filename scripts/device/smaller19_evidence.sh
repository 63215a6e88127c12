#!/usr/bin/env bash
# Evidence runs of issue 19 that the shared 2-core CPU machine could not finish (no GPU is needed; the device
# machine's idle CPUs are enough, and bench smaller trains on CUDA when it is there). From the repository root:
#
#     bash scripts/device/smaller19_evidence.sh [OUT]        # default OUT=runs/device-smaller19
#
# 1. bench smaller: LoRA, LoRAM and LoRAM with alignment pre-training (200 steps of 16 x 128 tokens), bundled
#    model, ratio 0.5, reverse, 80 steps, seed 0: the settings of benchmarks/smaller.md's table, in one run;
#    (since run on the CPU machine, one row per process: benchmarks/smaller.md, "200 alignment steps" section);
# 2. bench quantize: the CBQ perplexity/KL table (W4A16, W2A16) with the CFP truncation check;
# 3. bench quantize --only cfp: the CFP diagnosis table.
# About 10-20 minutes on 16 free cores. Copy OUT/*.md and *.json into benchmarks/ and update the tables.
set -euo pipefail
OUT=${1:-runs/device-smaller19}
export PYTHONPATH=src OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python -m lorakit.cli bench smaller --steps 80 --tasks reverse --only lora loram loram_aligned --output "$OUT"
python -m lorakit.cli bench quantize --output "$OUT"
python -m lorakit.cli bench quantize --only cfp --output "$OUT"
