"""How honest is "converged" after refinement? The optimizer's own test against a fresh look.

For each structure: the shipped model's one-shot prediction (``--start input``: the input
itself), then FIRE on a FrechetCellFilter with a real calculator until the optimizer reports
fmax < 0.05 eV/Å (at most 500 steps), as the relaxer did before issue 18 ("before"). The final structure is then evaluated afresh:
the largest atomic force, and the cell rows of a FrechetCellFilter built on it. Then
``e3relax_ase.relax.refine.refine`` from the same prediction ("after"), which judges convergence
that way and carries on with a fresh filter when the optimizer stopped early.

    python benchmarks/bench_convergence_record.py [--calculator emt|sevennet] [--start prediction|input] [--n 5] [--out FILE]

emt: the seven fcc metals EMT knows, conventional cells strained by +6 %, +10 % and -6 %, each
rattled with three seeds (63 structures).
sevennet: the first --n structures of the NREL test split with at most 12 atoms (SevenNet-0).

Writes JSON (command, machine, inputs, per-structure figures, summary) to
benchmarks/results/convergence_record_<calculator>_<start>_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FCC = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52, "Pd": 3.89, "Ag": 4.09, "Pt": 3.92, "Au": 4.08}


def _structures(calculator: str, n: int):
    from ase import Atoms
    from ase.build import bulk

    if calculator == "emt":
        for symbol, a in FCC.items():
            for strain in (1.06, 1.10, 0.94):
                for seed in range(3):
                    atoms = bulk(symbol, "fcc", a=a * strain, cubic=True)
                    atoms.rattle(0.05, seed=seed)
                    yield f"{symbol} x{strain} seed {seed}", atoms
        return
    from e3relax_ase.training.data.pairs import load_pairs

    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    found = 0
    for k in range(len(pairs)):
        if pairs.n_atoms[k] > 12:
            continue
        s = slice(pairs.offsets[k], pairs.offsets[k + 1])
        yield str(pairs.ids[k]), Atoms(pairs.numbers[s], positions=pairs.pos_unrelaxed[s], cell=pairs.cell_unrelaxed[k], pbc=True)
        found += 1
        if found == n:
            return


def _largest(rows) -> float:
    rows = np.asarray(rows).reshape(-1, 3)
    return float(np.sqrt((rows**2).sum(axis=1)).max())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calculator", default="emt", choices=["emt", "sevennet"])
    parser.add_argument("--start", default="prediction", choices=["prediction", "input"], help="where refinement starts")
    parser.add_argument("--n", type=int, default=5, help="structures (sevennet)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from e3relax_ase.relax.calculators import resolve_calculator
    from e3relax_ase.relax.refine import refine
    from e3relax_ase.relax.relaxer import OneShotRelaxer
    from e3relax_ase.relax.threads import single_threaded_blas

    factory = resolve_calculator(args.calculator)
    relaxer = OneShotRelaxer("default", device="cpu")
    rows = []
    started = time.perf_counter()
    for name, atoms in _structures(args.calculator, args.n):
        prediction = relaxer.relax(atoms) if args.start == "prediction" else atoms.copy()
        before = prediction.copy()
        before.calc = factory()
        with single_threaded_blas():
            cell_filter = FrechetCellFilter(before)
            optimizer = FIRE(cell_filter, logfile=None)
            optimizer_converged = bool(optimizer.run(fmax=args.fmax, steps=args.steps))
            own = _largest(cell_filter.get_forces())
            n = len(before)
            own_atoms, own_cell = _largest(cell_filter.get_forces()[:n]), _largest(cell_filter.get_forces()[n:])
            fresh = FrechetCellFilter(before).get_forces()
            fresh_atoms, fresh_cell = _largest(before.get_forces()), _largest(fresh[n:])
        after = prediction.copy()
        result = refine(after, factory(), fmax=args.fmax, steps=args.steps)
        rows.append(
            {
                "structure": name,
                "n_atoms": len(atoms),
                "before": {
                    "optimizer_converged": optimizer_converged,
                    "nsteps": int(optimizer.nsteps),
                    "optimizer_fmax": own,
                    "optimizer_fmax_atoms": own_atoms,
                    "optimizer_fmax_cell": own_cell,
                    "fresh_fmax_atoms": fresh_atoms,
                    "fresh_fmax_cell": fresh_cell,
                    "honest": optimizer_converged == (max(fresh_atoms, fresh_cell) < args.fmax),
                    "cell_rows_off_percent": 100 * abs(own_cell - fresh_cell) / fresh_cell if fresh_cell else None,
                    "atom_rows_off_percent": 100 * abs(own_atoms - fresh_atoms) / fresh_atoms if fresh_atoms else None,
                },
                "after": {
                    "converged": result.converged,
                    "nsteps": result.nsteps,
                    "fmax_atoms": result.fmax_atoms,
                    "fmax_cell": result.fmax_cell,
                },
            }
        )
        print(f"{name}: before converged={optimizer_converged} in {optimizer.nsteps} steps, own {own:.4f}, fresh atoms "
              f"{fresh_atoms:.4f} cell {fresh_cell:.4f} | after converged={result.converged} in {result.nsteps} steps, "
              f"atoms {result.fmax_atoms:.4f} cell {result.fmax_cell:.4f}", flush=True)  # fmt: skip
    dishonest = [r for r in rows if not r["before"]["honest"]]
    summary = {
        "structures": len(rows),
        "before_reported_converged": sum(r["before"]["optimizer_converged"] for r in rows),
        "before_converged_but_fresh_force_above_fmax": len(dishonest),
        "before_fresh_fmax_atoms_of_those": [round(r["before"]["fresh_fmax_atoms"], 4) for r in dishonest],
        "before_cell_rows_off_percent_median": float(np.median([r["before"]["cell_rows_off_percent"] or 0.0 for r in rows])),
        "before_cell_rows_off_percent_max": float(max(r["before"]["cell_rows_off_percent"] or 0 for r in rows)),
        "before_atom_rows_off_percent_max": float(max(r["before"]["atom_rows_off_percent"] or 0 for r in rows)),
        "after_converged": sum(r["after"]["converged"] for r in rows),
        "after_all_fresh_below_fmax": all(
            r["after"]["fmax_atoms"] < args.fmax and r["after"]["fmax_cell"] < args.fmax for r in rows if r["after"]["converged"]
        ),
        "extra_steps_median": float(np.median([r["after"]["nsteps"] - r["before"]["nsteps"] for r in rows])),
        "extra_steps_max": int(max(r["after"]["nsteps"] - r["before"]["nsteps"] for r in rows)),
    }
    import torch

    results = {
        "benchmark": "convergence_record",
        "command": " ".join(["python", "benchmarks/bench_convergence_record.py", *(argv if argv is not None else sys.argv[1:])]),
        "calculator": args.calculator,
        "start": args.start,
        "fmax": args.fmax,
        "steps": args.steps,
        "checkpoint": relaxer.info.name,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "structures": rows,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"convergence_record_{args.calculator}_{args.start}_cpu.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return results


if __name__ == "__main__":
    main()
