#!/usr/bin/env bash
# One device call on one H200 (nvidia-h200): the inference figures of this tree against an older
# revision's package, measured one after the other in the same call, then the GPU tests.
#
#   here:  mkdir -p .gpu/old && git archive REV e3relax_ase | tar -x -C .gpu/old
#          rm .gpu/old/e3relax_ase/checkpoints && ln -s ../../checkpoints .gpu/old/checkpoints
#   there: bash scripts/gpu_compare.sh          (carry .whl and .gpu/old)
#
# Writes $OUT/e2e_old.json / .txt, $OUT/e2e_new.json / .txt and prints the ratios.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
COMMON="--device cuda --workers 0,12 --e2e-n 16384 --precisions float32,tf32 --paper-e2e --skip forward,scaling"
PYTHONPATH=/tmp/site:$PWD/.gpu/old timeout "${OLD_S:-200}" python3 benchmarks/bench_inference.py $COMMON \
    --out "$OUT/e2e_old.json" > "$OUT/e2e_old.txt" 2>&1
echo "old: rc $?"
PYTHONPATH=/tmp/site timeout "${NEW_S:-260}" python3 benchmarks/bench_inference.py $COMMON --sevennet 8 \
    --out "$OUT/e2e_new.json" > "$OUT/e2e_new.txt" 2>&1
echo "new: rc $?"
python3 benchmarks/compare_results.py "$OUT/e2e_old.json" "$OUT/e2e_new.json"
sed -n '/checkpoint e3relax/,$p' "$OUT/e2e_new.txt" | grep -v '^ \|^{\|^}'
PYTHONPATH=/tmp/site:$PWD timeout "${TESTS_S:-90}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_async_forward.py tests/test_graphed.py tests/test_determinism.py 2>&1 | tail -5
