#!/usr/bin/env bash
# CUDA check of data-parallel training (needs >= 2 GPUs: NCCL refuses two ranks on one device).
# 2 processes (nccl) at --batch-size 4 under DDP and FSDP against 1 process at --batch-size 8, bundled model:
# the adapters must agree to Adam-step noise (see tests/training/test_training_distributed.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/lorakit_dist_check}
rm -rf "$OUT"
ARGS="train --data reverse --train-examples 64 --eval-examples 8 --steps 4 --grad-accum 2 --max-length 64 \
  --warmup-steps 0 --lr-schedule constant --save-every 2 --log-every 1 --r 8 --quiet"
$PY -m lorakit $ARGS --batch-size 8 --output "$OUT/one"
for mode in ddp fsdp; do
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m lorakit -- $ARGS --batch-size 4 \
    --distributed $mode --output "$OUT/$mode"
done
$PY - "$OUT" <<'PYEOF'
import sys
from lorakit.io.files import load_tensors
out = sys.argv[1]
ref = load_tensors(f"{out}/one/adapter/adapter_model.safetensors")
for mode in ("ddp", "fsdp"):
    got = load_tensors(f"{out}/{mode}/adapter/adapter_model.safetensors")
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(f"{mode}: max |adapter - single process| = {diff:.2e}", "OK" if diff < 1e-3 else "MISMATCH")
PYEOF
