"""Downstream check: FIRE steps a real calculator needs from the one-shot output vs the raw input.

Held-out structures (``--data``, a test split: chemical systems unseen in training). For each,
SevenNet-0 + FIRE + FrechetCellFilter (fmax 0.05, <= 500 steps) relaxes (a) the unrelaxed input
and (b) the default model's one-shot prediction. Reports the median of the per-structure step
ratio (b / a), and how the two minima compare: the share of structures whose refinement from
the prediction ends more than 5 meV/atom above (or below) the one reached from the raw input
(two starts may fall into different local minima). Writes JSON to benchmarks/results/.

    python benchmarks/bench_refinement_steps.py [--n 100] [--data data/sevennet0_distilled_v2/test.npz]
        [--calculator sevennet|emt] [--device cpu] [--out FILE]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--calculator", default="sevennet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-atoms", type=int, default=16)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--data", default="data/sevennet0_distilled_v2/test.npz")
    parser.add_argument("--energy-margin", type=float, default=0.005, help="eV/atom")
    parser.add_argument("--out")
    args = parser.parse_args()
    from ase import Atoms
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from e3relax_ase.relax.calculators import resolve_calculator
    from e3relax_ase.relax.relaxer import OneShotRelaxer
    from e3relax_ase.training.data.pairs import load_pairs

    torch.set_num_threads(1)
    relaxer = OneShotRelaxer("default", device=args.device)
    calculator = resolve_calculator(args.calculator)
    calculator = calculator() if callable(calculator) and not hasattr(calculator, "get_potential_energy") else calculator
    pairs = load_pairs(ROOT / args.data)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pairs))
    rows = []
    for k in order:
        if len(rows) == args.n:
            break
        if pairs.n_atoms[k] > args.max_atoms:
            continue
        atoms_slice = slice(pairs.offsets[k], pairs.offsets[k + 1])
        raw = Atoms(pairs.numbers[atoms_slice], positions=pairs.pos_unrelaxed[atoms_slice], cell=pairs.cell_unrelaxed[k], pbc=pairs.pbc[k])
        try:
            predicted = relaxer.relax(raw)
        except ValueError:  # refused input (e.g. overlapping atoms): not part of the comparison
            continue
        row = {"id": str(pairs.ids[k]), "n_atoms": int(pairs.n_atoms[k])}
        for label, start in (("raw", raw.copy()), ("one_shot", predicted.copy())):
            start.info = {}
            start.calc = calculator
            optimizer = FIRE(FrechetCellFilter(start), logfile=None)
            tick = time.perf_counter()
            try:
                converged = optimizer.run(fmax=args.fmax, steps=500)
            except (ValueError, FloatingPointError, RuntimeError):
                converged = False
            row[f"{label}_steps"] = optimizer.get_number_of_steps()
            row[f"{label}_converged"] = bool(converged)
            row[f"{label}_seconds"] = time.perf_counter() - tick
            try:
                row[f"{label}_energy_per_atom"] = float(start.get_potential_energy()) / len(start)
            except (ValueError, FloatingPointError, RuntimeError):
                row[f"{label}_energy_per_atom"] = float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)
    both = [r for r in rows if r["raw_converged"] and r["one_shot_converged"]]
    ratios = [r["one_shot_steps"] / max(r["raw_steps"], 1) for r in both]
    energy_gap = np.array([r["one_shot_energy_per_atom"] - r["raw_energy_per_atom"] for r in both])
    summary = {
        "command": " ".join(["python"] + sys.argv),
        "device": args.device,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "calculator": args.calculator,
        "fmax": args.fmax,
        "checkpoint": relaxer.info.name,
        "n": len(rows),
        "n_both_converged": len(both),
        "median_steps_raw": float(np.median([r["raw_steps"] for r in both])) if both else None,
        "median_steps_one_shot": float(np.median([r["one_shot_steps"] for r in both])) if both else None,
        "median_ratio_one_shot_over_raw": float(np.median(ratios)) if ratios else None,
        "data": args.data,
        "energy_margin_ev_per_atom": args.energy_margin,
        "share_ending_higher": float(np.mean(energy_gap > args.energy_margin)) if both else None,
        "share_ending_lower": float(np.mean(energy_gap < -args.energy_margin)) if both else None,
        "median_energy_gap_ev_per_atom": float(np.median(energy_gap)) if both else None,
        "rows": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"refinement_steps_{args.calculator}_{args.device}.json"
    out.write_text(json.dumps(summary, indent=1))
    print({k: v for k, v in summary.items() if k != "rows"})


if __name__ == "__main__":
    main()
