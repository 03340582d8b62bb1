#!/usr/bin/env bash
# One device call on one H200 (nvidia-h200): the end-to-end figures of this tree against an
# older revision's package, in the same call, alternating old / new twice (the host's speed
# drifts between machines and within a call), then the GPU tests.
#
#   here:  mkdir -p .gpu/old && git archive REV e3relax_ase | tar -x -C .gpu/old
#          ln -s ../../checkpoints .gpu/old/checkpoints   # the package's checkpoints link resolves through it
#   there: bash scripts/gpu_compare.sh                     (carry .whl and .gpu/old)
#
# Writes $OUT/e2e_{old,new}_{1,2}.json and prints the ratios of each pair. OLD_WORKERS / NEW_WORKERS:
# the --workers lists (default 0,12; the paper-size runs use the last).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
COMMON="--device cuda --e2e-n ${E2E_N:-8192} --precisions float32,tf32 --paper-e2e --skip forward,scaling"
for round in 1 2; do
    PYTHONPATH=/tmp/site:$PWD/.gpu/old timeout "${RUN_S:-100}" python3 benchmarks/bench_inference.py $COMMON \
        --workers "${OLD_WORKERS:-0,12}" --out "$OUT/e2e_old_$round.json" > /dev/null 2> "$OUT/old.err"
    echo "old $round: rc $?"
    extra=""; [ "$round" = 2 ] && extra="--sevennet 8"
    PYTHONPATH=/tmp/site timeout "${RUN_S:-100}" python3 benchmarks/bench_inference.py $COMMON $extra \
        --workers "${NEW_WORKERS:-0,12}" --out "$OUT/e2e_new_$round.json" > /dev/null 2> "$OUT/new.err"
    echo "new $round: rc $?"
    python3 benchmarks/compare_results.py "$OUT/e2e_old_$round.json" "$OUT/e2e_new_$round.json"
done
python3 -c "import json; r = json.load(open('$OUT/e2e_new_2.json')); print('SevenNet-0 + FIRE:', r.get('sevennet_fire'), 'ratio', r.get('speedup_vs_sevennet_fire'))"
PYTHONPATH=/tmp/site:$PWD timeout "${TESTS_S:-90}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/relax/test_async_forward.py tests/nn/test_graphed.py tests/relax/test_determinism.py 2>&1 | tail -15
