#!/usr/bin/env bash
# One device call on nvidia-h200 (~8 min) for issue 19's end-to-end figure: the relax command as
# a process (benchmarks/bench_cli.py) on 10^5 NREL-class frames in one extxyz and on a folder of
# 10^4 CIFs, then 2*10^4 rows of an ASE db, with the default checkpoint. OLD_TREE (a folder
# holding an older e3relax_ase, e.g. `git archive REV e3relax_ase | tar -x -C .gpu/old`) adds the
# old code's run in the same call. Needs the cp312 wheels in .whl (carry .whl, and .gpu/old).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
old=()
if [ -n "${OLD_TREE:-}" ]; then old=(--old-tree "$OLD_TREE"); fi
timeout "${FILES_S:-360}" python3 benchmarks/bench_cli.py --n "${N:-100000}" --inputs extxyz,cifs --cif-files "${CIFS:-10000}" \
    --device cuda "${old[@]}" --work runs/bench_cli --out "$OUT/cli_h200_files.json" > "$OUT/cli_h200_files.txt" 2>&1
echo "files: rc $?"
timeout "${DB_S:-180}" python3 benchmarks/bench_cli.py --n "${DB_N:-20000}" --inputs db --device cuda "${old[@]}" \
    --work runs/bench_cli --out "$OUT/cli_h200_db.json" > "$OUT/cli_h200_db.txt" 2>&1
echo "db: rc $?"
tail -n 12 "$OUT"/*.txt
