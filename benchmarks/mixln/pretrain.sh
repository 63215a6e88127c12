#!/usr/bin/env bash
# The four small bases of benchmarks/ul2 and benchmarks/mixln, one budget: same corpus, shape, steps, lr, seed.
# pre = plain Llama (Pre-LN) with next-token loss, the baseline of both comparisons; post / mix change the
# norm placement (Mix-LN, alpha 0.25: 2 of 8 layers Post-LN); ul2 changes the objective (mixture of denoisers).
set -euo pipefail
OUT=${OUT:-runs/pretrain-small}
SHAPE="--stdlib-chars 600000 --vocab-size 1024 --hidden-size 96 --num-layers 8 --num-heads 4 --num-kv-heads 2
       --intermediate-size 256 --seq-len 128 --batch-size 16 --steps 150 --warmup-steps 15 --lr 2e-3
       --num-threads 1 --log-every 25 --no-bf16"
mkdir -p "$OUT"
for run in "pre --norm pre" "post --norm post" "mix --norm mix --mix-ln-alpha 0.25" "ul2 --objective ul2"; do
  set -- $run
  name=$1; shift
  [ -e "$OUT/$name.log" ] && continue  # done, or running in another invocation of this script (run two to use 2 cores)
  python -m lorakit pretrain-base --out "$OUT/$name" $SHAPE "$@" > "$OUT/$name.log" 2>&1
done
