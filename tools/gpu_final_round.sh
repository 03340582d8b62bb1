#!/usr/bin/env bash
# Final training round (round 3: NREL + distilled pairs from the round-2 weights) then the GPU inference benchmarks with the
# resulting weights, in one device call. Usage: tools/gpu_final_round.sh BUDGET_MINUTES
set -u
bash scripts/gpu_train_round.sh "$1" checkpoints/configs/e3relax_h2_f128.yaml > "$OUT/round.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'PY' >> "$OUT/round.txt" 2>&1
from e3relax_ase.training.train.export import export_checkpoint
print(export_checkpoint("runs/e3relax_h2_f128", "runs/candidate.pt", {"name": "candidate"}))
PY
python3 benchmarks/bench_inference.py --device cuda --checkpoint runs/candidate.pt --out "$OUT/inference_cuda.json" > "$OUT/bench.txt" 2>&1
tail -n 20 "$OUT/bench.txt"
