#!/usr/bin/env bash
# LoRA on built-in tasks on top of the causal (runs/pretrain-small/pre) and the UL2 (runs/pretrain-small/ul2)
# small bases of benchmarks/mixln/pretrain.sh; the UL2 base is fine-tuned in mode [S] (the paper's mode
# switching: S for generation-style tasks) and, as an ablation, without a mode token.
# Run 2 (benchmarks/ul2/pretrain.sh): RUNS=runs/ul2-long CAUSAL=causal OUT=runs/ul2-long-lora TASKS="..." lora.sh
set -euo pipefail
mkdir -p "${OUT:-runs/ul2-lora}"
RUNS=${RUNS:-runs/pretrain-small}
OUT=${OUT:-runs/ul2-lora}
TASKS=${TASKS:-"upper add"}
CAUSAL=${CAUSAL:-pre}  # the causal base's folder under RUNS (the UL2 base is RUNS/ul2)
BASES=${BASES:-"causal ul2-S ul2-none"}  # a subset runs only those rows (e.g. BASES=causal before the UL2 base exists)
COMMON="--steps 60 --batch-size 16 --lr 3e-3 --r 8 --lora-alpha 16 --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
        --train-examples 960 --eval-examples 64 --quiet --overwrite"
for task in $TASKS; do
  for run in "causal $CAUSAL" "ul2-S ul2 --mode-token [S]" "ul2-none ul2"; do
    set -- $run
    [[ " $BASES " == *" $1 "* ]] || continue
    name=$1; base=$2; shift 2
    [ -e "$OUT/$name-$task/summary.json" ] && continue
    python -m lorakit train --model "$RUNS/$base" --data "$task" --output "$OUT/$name-$task" $COMMON "$@" \
      > "$OUT.$name-$task.log" 2>&1 || echo "failed: $name $task (see $OUT.$name-$task.log)"
  done
done
python "$(dirname "$0")/table.py" "$(dirname "$RUNS")" --pretrain "$(basename "$RUNS")" --causal "$CAUSAL" \
  --lora "$(basename "$OUT")"
