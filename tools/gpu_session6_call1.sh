#!/usr/bin/env bash
# Session 6, GPU call 1: the training benchmark (old trainer vs new, same call), whose new
# 150-second run is the start of the Zintl recipe on the basis-free network.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/vesin_torch-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench_training.py --old .gpu/old --device cuda --throughput-seconds 20 --train-seconds 130 \
  --variants count64,atoms3072,atoms3072+amp,atoms3072+compile --work .gpu/bench_training --out "$OUT/training_cuda_h200.json" 2>&1 | tail -60
python3 - <<'PY'
import os
from e3relax_ase.training.train.export import write_portable_state
write_portable_state(".gpu/bench_training/new_run", os.environ["OUT"] + "/zintl_portable_state.pt")
PY
cp .gpu/bench_training/new_run/log.csv "$OUT/zintl_log_call1.csv" 2>/dev/null
cp .gpu/bench_training/old_run/log.csv "$OUT/old_log_call1.csv" 2>/dev/null
ls -la "$OUT"
