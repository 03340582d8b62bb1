"""Single-structure latency on the CPU with the shipped checkpoint: a ~20-atom real crystal,
through OneShotRelaxer.relax (ase.Atoms in, relaxed Atoms out) and through the bare network.

    python benchmarks/bench_cpu_latency.py [--threads 2]
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()
torch.set_num_threads(args.threads)

from ase import Atoms  # noqa: E402

from e3relax_ase.predict import CrystalArrays, predict  # noqa: E402
from e3relax_ase.relaxer import OneShotRelaxer  # noqa: E402
from e3relax_ase.training.pairs import load_pairs  # noqa: E402

pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
k = next(k for k in range(len(pairs)) if pairs.n_atoms[k] == 20)
s = slice(pairs.offsets[k], pairs.offsets[k + 1])
atoms = Atoms(pairs.numbers[s], positions=pairs.pos_unrelaxed[s], cell=pairs.cell_unrelaxed[k], pbc=True)
results = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "threads": args.threads, "load_average_1min": os.getloadavg()[0],
           "torch": torch.__version__, "structure": str(pairs.ids[k]), "atoms": 20}
for dtype in ("float32", "float64"):
    relaxer = OneShotRelaxer("default", device="cpu", dtype=dtype)
    relaxer.relax(atoms)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        relaxer.relax(atoms)
        times.append(time.perf_counter() - start)
    crystal = CrystalArrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
    bare = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        predict(relaxer.model, [crystal], "cpu", relaxer.dtype)
        bare.append(time.perf_counter() - start)
    results[dtype] = {"relax_median_ms": 1e3 * float(np.median(times)), "predict_median_ms": 1e3 * float(np.median(bare))}
    results["checkpoint"] = relaxer.info.name
out = ROOT / "benchmarks" / "results" / "cpu_latency.json"
out.write_text(json.dumps(results, indent=1))
print(json.dumps(results, indent=1))
