#!/usr/bin/env bash
# GPU check for the serving kernel and benchmarks (run on a CUDA machine from the repo root; $OUT = result folder).
# Stage 1 ("smoke"): kernel tests on CUDA, decode/prefill microbench (kernel vs torch bank path vs PEFT), a quick
# `bench serve` on CUDA. Stage 2 ("full"): the S-LoRA workload rows on CUDA. Stage "graphs": the CUDA-graph
# decode step (Engine(cuda_graphs=True)): greedy tokens vs the eager engine, ms per decode step, bench serve rows
# with lorakit_graphs / merged_graphs (scripts/device/graph_check.py; about 5 minutes), then n choices on the
# static step vs separate eager requests (scripts/device/choices_cuda.py), and eager vs graphs on the 4-bit base
# (scripts/device/serve_quantized_cuda.py).
set -u
STAGE="${1:-smoke}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
PY="${PY:-python3}"
"$PY" -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "$STAGE" = smoke ]; then
  timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/serving/test_serving_triton.py 2>&1 | tail -15
  timeout 120 "$PY" -m lorakit.bench.serving --device cuda --dtype bfloat16 --ns 1 16 64 1024 --batch 64 --tokens 1 \
    --repeats 30 --load-n 0 --peft-max-n 64 --out "$OUT/decode_bf16.json" 2>&1 | grep -v '^ ' | tail -8
  timeout 90 "$PY" -m lorakit.bench.serving --device cuda --dtype bfloat16 --ns 1 64 --batch 16 --tokens 256 \
    --repeats 10 --load-n 0 --peft-max-n 64 --out "$OUT/prefill_bf16.json" 2>&1 | grep -v '^ ' | tail -6
  timeout 150 "$PY" -m lorakit bench serve --quick --device cuda --output "$OUT/serve_quick" 2>&1 | tail -8
fi
if [ "$STAGE" = full ]; then
  timeout 100 "$PY" -m lorakit.bench.serving --device cuda --dtype bfloat16 --ns 1 16 1024 --batch 64 --tokens 1 \
    --repeats 30 --load-n 0 --peft-max-n 16 --out "$OUT/decode_bf16.json" 2>&1 | grep -v '^ ' | tail -5
  timeout 60 "$PY" -m lorakit bench serve --quick --device cuda --output /tmp/serve_quick 2>&1 | tail -4
  timeout 300 "$PY" -m lorakit bench serve --device cuda --models bundled random8x512 --num-adapters 100 1000 \
    --req-rate 60 --duration 4 --max-batch 32 --peft-max-n 100 --output "$OUT/serve" 2>&1 | tail -30
fi
if [ "$STAGE" = graphs ]; then
  timeout 420 "$PY" scripts/device/graph_check.py --out "$OUT/graphs.json" 2>&1 | grep -v "Loading weights" | tail -40
  PYTHONPATH="$PWD/src:$PWD/tests/serving:$PWD/tests" timeout 120 "$PY" scripts/device/choices_cuda.py cuda 2>&1 | tail -20
  PYTHONPATH="$PWD/src:$PWD/tests/serving:$PWD/tests" timeout 120 "$PY" scripts/device/serve_quantized_cuda.py cuda 2>&1 | grep -v "Loading weights" | tail -3
fi
