#!/usr/bin/env bash
# One training round on the device machine: install carried wheels, train the configs given
# as arguments concurrently on one GPU for a time budget, and put logs and best EMA weights
# (split into <= 15 MiB parts) under $OUT. Re-running resumes from runs/ when the machine is
# still warm; otherwise from .gpu/runs/<name>/best_ema.pt is NOT enough to resume exactly
# (optimizer state stays on the machine), so a cold round starts that config afresh.
# Usage: scripts/gpu_train_round.sh BUDGET_MINUTES CONFIG.yaml...
set -u
budget=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p runs
# Prepare the data cache once, before the concurrent runs read it.
python3 - "$@" <<'PY'
import sys
from e3relax_ase.training.train.config import TrainConfig
from e3relax_ase.training.train.dataset import load_or_prepare
c = TrainConfig.from_yaml(sys.argv[1]); m = c.model_config
load_or_prepare(c.train_data, m.cutoff, m.max_neighbors, c.cache_dir)
load_or_prepare(c.val_data, m.cutoff, m.max_neighbors, c.cache_dir, max_pairs=c.val_max_pairs)
PY
for config in "$@"; do
  name=$(basename "$config" .yaml)
  python3 -m e3relax_ase train "$config" --time-budget "$budget" > "$OUT/$name.json" 2> "$OUT/$name.log" &
done
wait
for config in "$@"; do
  name=$(basename "$config" .yaml)
  cp "runs/$name/log.csv" "$OUT/$name.csv" 2>/dev/null
  if [ -f "runs/$name/best_ema.pt" ]; then
    split -b 15M -d "runs/$name/best_ema.pt" "$OUT/$name.best_ema.pt.part"
  fi
done
ls -la "$OUT"
