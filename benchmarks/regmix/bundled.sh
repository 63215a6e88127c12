#!/usr/bin/env bash
# RegMix at the bundled base's shape (5.4M parameters: hidden 256, 6 layers, vocab 4096, seq 128, batch 16, lr 3e-3,
# fp32, one thread): the searched mixture vs uniform vs natural, one process per mixture so a finished one survives
# a stop (and --checkpoint-every 25 keeps its state: rerun this script to resume). The step budget is reduced (STEPS, default 300; the shipped base has 1500), equal for the three.
# Domains at half their natural budget (--mixture-scale 0.5), as in the proxy sweep, so "natural" is the shares the
# RegMix search started from. Then: python benchmarks/regmix/bundled_table.py runs/regmix-bundled
set -euo pipefail
OUT=${OUT:-runs/regmix-bundled}
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-20}
MIXTURES=${MIXTURES:-"regmix uniform natural"}
mkdir -p "$OUT"
for mixture in $MIXTURES; do
  [ -e "$OUT/$mixture/pretrain_info.json" ] && continue
  python -m lorakit pretrain-base --out "$OUT/$mixture" --mixture "$mixture" --mixture-scale 0.5 \
    --regmix-dir "$(dirname "$0")" --steps "$STEPS" --warmup-steps "$WARMUP" --no-bf16 --num-threads 1 --log-every 25 --checkpoint-every 25 \
    >> "$OUT/$mixture.log" 2>&1 || echo "failed: $mixture (see $OUT/$mixture.log)"
done
