#!/usr/bin/env bash
# One device call on one H200 (nvidia-h200, or one GPU of nvidia-h200-x2) for the inference
# figures of issue #6: stages, end to end (one process, 14 workers, precisions, compiled),
# end to end at the paper's size (--paper-e2e), the forward table with the roofline (each
# precision eager and compiled), latency, cell-size scaling, and SevenNet-0 + FIRE in the same run. Needs the cp312 wheels in .whl
# (carry it). Writes $OUT/inference_e2e_cuda.json and .txt.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
timeout "${INFER_S:-560}" python3 benchmarks/bench_inference.py --device cuda --sevennet 8 --workers 0,14 \
    --e2e-n "${E2E_N:-16384}" --precisions float32,tf32 --paper-e2e --compile \
    --out "$OUT/inference_e2e_cuda.json" > "$OUT/inference_e2e_cuda.txt" 2>&1
echo "inference: rc $?"
sed -n '/checkpoint e3relax/,$p' "$OUT/inference_e2e_cuda.txt"
