#!/usr/bin/env bash
# Run 2's task choice: exact match of the two bases (no LoRA) on every built-in task, 64 test items each; the LoRA
# comparison uses tasks where a base already answers some items (a non-zero starting point).
set -euo pipefail
RUNS=${RUNS:-runs/ul2-long}
TASKS=${TASKS:-add,length,lookup,mul,py_argc,py_name,reverse,rotate,sort,upper}
python -m lorakit eval --model "$RUNS/causal" --data "$TASKS" --eval-examples 64 --quiet --json > "$RUNS/check_causal.txt"
python -m lorakit eval --model "$RUNS/ul2" --data "$TASKS" --eval-examples 64 --quiet --json --mode-token "[S]" > "$RUNS/check_ul2-S.txt"
tail -n 40 "$RUNS"/check_*.txt
