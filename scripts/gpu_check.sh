#!/usr/bin/env bash
# One command for the day a GPU is lent: the cuda-marked tests, then the benchmarks on CUDA (bfloat16).
# Budget: under 8 minutes on one GPU. Run from the repo root: bash scripts/gpu_check.sh
# Results: loadtest/results/gpu/{bench.json,engine_v2.json,quantization.json} and the pytest summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}  # make gpu-check runs this
OUT=loadtest/results/gpu
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", ok, torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 1)'
export PYTHONPATH="$PWD/service:$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== cuda tests (parity, paging, chunked prefill, prefix caching on the GPU)"
timeout 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_engine_parity.py tests/test_engine_paging.py \
  tests/test_engine_compiled_step.py

echo "== engine v2 benchmarks on CUDA (bf16): prefix caching, chunked prefill, KV capacity"
timeout 150 "$PY" loadtest/engine_v2.py --device cuda --repeats 1 --out "$OUT" || echo "engine_v2: a target was missed (see the table)"

echo "== throughput benchmark on CUDA (bf16): base vs 16 adapters over HTTP, HF+PEFT mixed batch"
timeout 150 "$PY" loadtest/bench.py --device cuda --repeats 1 --skip-naive --skip-engine-sections --out "$OUT" \
  || echo "bench: a target was missed (see the table)"
echo "== quantized base on CUDA (bf16): weight bytes, perplexity, decode tok/s for none/int8/nf4 (stories260k)"
timeout 150 "$PY" loadtest/quantization.py --device cuda --repeats 1 --out "$OUT" || echo "quantization: failed (see above)"
echo "== done: $OUT"
