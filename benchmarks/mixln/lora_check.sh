#!/usr/bin/env bash
# LoRA on the Mix-LN small base with `lorakit train`, then real peft loads the saved adapter on the same base
# and gives lorakit's outputs.
set -euo pipefail
BASE=${BASE:-runs/pretrain-small/mix}
OUT=${OUT:-runs/mixln-lora}
python -m lorakit train --model "$BASE" --data upper --steps 40 --batch-size 16 --lr 3e-3 --r 8 --lora-alpha 16 \
  --target-modules q_proj v_proj --train-examples 640 --eval-examples 64 --output "$OUT" --quiet --overwrite
python - "$BASE" "$OUT/adapter" <<'PY'
import sys, torch
import lorakit
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter = sys.argv[1:]
ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
ours = AutoModelForCausalLM.from_pretrained(base).eval()
lorakit.load_adapter(ours, adapter)
theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    a, b = ours(ids).logits, theirs(ids).logits
print(type(theirs.base_model.model).__name__, "max |lorakit - peft| =", (a - b).abs().max().item())
PY
