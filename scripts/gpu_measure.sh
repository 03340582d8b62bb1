#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (2 GPUs, ~9 min) for the scaling, mixed-precision and
# inference figures: benchmarks/bench_multi_gpu.py train (1 vs 2 GPUs, bf16 autocast vs
# float32), bench_multi_gpu.py relax (1 vs 2 GPUs), bench_inference.py (stages, end to end
# with workers / precision / compile, forward table with the roofline, latency, cell-size
# scaling, SevenNet-0 + FIRE in the same run). Needs the cp312 wheels in .whl (carry it).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p runs
timeout "${TRAIN_S:-240}" python3 benchmarks/bench_multi_gpu.py train --gpus 2 --epochs 6 --amp "${AMP:-skip}" --out "$OUT/multi_gpu_train.json" > "$OUT/multi_gpu_train.txt" 2>&1
echo "train: rc $?"
timeout "${RELAX_S:-130}" python3 benchmarks/bench_multi_gpu.py relax --gpus 2 --n "${RELAX_N:-16000}" --workers 6 --out "$OUT/multi_gpu_relax.json" > "$OUT/multi_gpu_relax.txt" 2>&1
echo "relax: rc $?"
timeout "${INFER_S:-215}" python3 benchmarks/bench_inference.py --device cuda --sevennet 8 --workers 0,12 --out "$OUT/inference_cuda_h200.json" > "$OUT/inference_cuda_h200.txt" 2>&1
echo "inference: rc $?"
tar czf "$OUT/logs.tar.gz" runs/bench_multi_gpu/*.log runs/bench_multi_gpu/*/log.csv runs/bench_multi_gpu/*/summary.json 2>/dev/null
tail -n 25 "$OUT"/*.txt
