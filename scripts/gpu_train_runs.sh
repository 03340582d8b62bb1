#!/usr/bin/env bash
# One training call on the GPU machine: continue runs from portable states carried in .gpu/carry, each for
# its share of the call, and bring back their portable states, best EMA weights and logs.
# Usage: scripts/gpu_train_runs.sh NAME:CONFIG:MINUTES ...   (NAME's state: .gpu/carry/NAME_portable_state.pt)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/vesin_torch-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
for run in "$@"; do
  IFS=: read -r name config minutes <<< "$run"
  out_dir=$(python3 -c "from e3relax_ase.training.train.config import TrainConfig; print(TrainConfig.from_yaml('$config').out_dir)")
  mkdir -p "$out_dir"
  [ -f ".gpu/carry/${name}_portable_state.pt" ] && cp ".gpu/carry/${name}_portable_state.pt" "$out_dir/training_state.pt"
  python3 -m e3relax_ase train "$config" --time-budget "$minutes" > "$OUT/${name}_summary.json" 2> "$OUT/${name}.log"
  tail -3 "$OUT/${name}.log"
  python3 -c "from e3relax_ase.training.train.export import write_portable_state; write_portable_state('$out_dir', '$OUT/${name}_portable_state.pt')"
  cp "$out_dir/best_ema.pt" "$OUT/${name}_best_ema.pt"
  cp "$out_dir/log.csv" "$OUT/${name}_log.csv"
done
ls -la "$OUT"
