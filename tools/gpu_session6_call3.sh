#!/usr/bin/env bash
# Session 6, GPU call 3: the old trainer against the new one at the universal run's batch
# (12,288 atoms) in one call, then the universal run continued.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/vesin_torch-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/bench_training.py --old .gpu/old --device cuda --throughput-seconds 20 --train-seconds 0 \
  --variants atoms3072,atoms12288 --work .gpu/bench_training --out "$OUT/training_cuda_h200_batch12288.json" 2>&1 | grep -E '"(variant|pairs_per_s|trainer)"'
bash scripts/gpu_train_runs.sh universal:checkpoints/configs/universal_f128.yaml:4.0
