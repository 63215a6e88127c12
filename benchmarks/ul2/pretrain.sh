#!/usr/bin/env bash
# The two bases of the second UL2 comparison (benchmarks/ul2/README.md, "Run 2"): the shape of the first run
# (0.91M parameters: hidden 96, 8 layers, vocab 1024, seq 128, batch 16, lr 2e-3, fp32, one thread) with a longer
# budget (STEPS, default 1000, equal for both) and a task-heavier corpus (600k stdlib chars + 1.8M task chars:
# --task-fraction 0.75), so that the causal base answers some task items. Only --objective differs.
# Run two invocations at once to use two cores (each skips a finished run and one the other is running). A stopped
# run resumes from its checkpoint (OUT/NAME.checkpoint, every 25 steps) when the script is run again.
set -euo pipefail
OUT=${OUT:-runs/ul2-long}
STEPS=${STEPS:-1000}
SHAPE="--stdlib-chars 600000 --task-fraction 0.75 --vocab-size 1024 --hidden-size 96 --num-layers 8 --num-heads 4
       --num-kv-heads 2 --intermediate-size 256 --seq-len 128 --batch-size 16 --steps $STEPS --warmup-steps 50
       --lr 2e-3 --num-threads 1 --log-every 25 --no-bf16 --checkpoint-every 25"
mkdir -p "$OUT"
for run in "causal --objective causal" "ul2 --objective ul2"; do
  set -- $run
  name=$1; shift
  [ -e "$OUT/$name/pretrain_info.json" ] && continue  # done
  exec 9>"$OUT/$name.lock"
  flock -n 9 || continue  # running in the other invocation (the lock goes with its process)
  python -m lorakit pretrain-base --out "$OUT/$name" $SHAPE "$@" >> "$OUT/$name.log" 2>&1
  exec 9>&-
done
