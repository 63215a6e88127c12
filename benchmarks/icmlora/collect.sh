#!/usr/bin/env bash
# Train the adapter collection the ICM-LoRA generator learns from: LoRA r=4 on q_proj/v_proj of the
# bundled base, one run per (task, seed), a checkpoint every 50 steps (run.py uses steps 150-300, each
# checkpoint one training sample, as the paper collects checkpoints from several epochs per task).
# Usage: [SEEDS="0 1"] benchmarks/icmlora/collect.sh OUT_DIR [TASK...]   (default: rotate rotate2..rotate5 reverse sort)
set -euo pipefail
out=${1:-runs/icmlora/collection}; shift || true
tasks=${*:-rotate rotate2 rotate3 rotate4 rotate5 reverse sort}
for task in $tasks; do
  for seed in ${SEEDS:-0 1}; do
    run="$out/$task-s$seed"
    [ -f "$run/adapter/adapter_model.safetensors" ] && continue
    python -m lorakit train --data "$task" --seed "$seed" --r 4 --lora-alpha 8 --target-modules q_proj v_proj \
      --steps 300 --save-every 50 --eval-examples 100 --log-every 50 --num-threads 1 --quiet \
      --output "$run" --overwrite
  done
done
