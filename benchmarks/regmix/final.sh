#!/usr/bin/env bash
# Final RegMix comparison at a reduced model size (0.5M parameters; the bundled base is 5.4M): the same
# budget, tokenizer recipe, held-out text and seed, only the domain mixture differs.
# usage: benchmarks/regmix/final.sh OUT_ROOT REGMIX_DIR MIXTURE...
set -euo pipefail
root=$1; regmix_dir=$2; shift 2
for mixture in "$@"; do
  python -m lorakit pretrain-base --out "$root/$mixture" --mixture "$mixture" --regmix-dir "$regmix_dir" \
    --mixture-scale 0.5 --vocab-size 2048 --hidden-size 96 --num-layers 3 --num-heads 4 --num-kv-heads 2 \
    --intermediate-size 256 --max-position-embeddings 128 --seq-len 128 --batch-size 16 --steps 400 \
    --warmup-steps 40 --lr 3e-3 --num-threads 1 --log-every 50 > "$root/$mixture.log" 2>&1
done
