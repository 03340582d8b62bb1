"""Calibrate the refine-advised signal: does the last layer's relative correction predict error?

On the NREL DFT test split, compares each structure's ``e3relax_correction_ratio`` (the last
layer's correction relative to the whole predicted change, e3relax_ase/sanity.py) with its
actual coordinate error (the model card's per_structure.csv). Prints the rank correlation and,
per threshold, how many structures are flagged and their mean error vs the rest.

    python benchmarks/calibrate_confidence.py
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rank(values):
    order = np.argsort(values)
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def main():
    from ase import Atoms

    from e3relax_ase.checkpoint import read_registry
    from e3relax_ase.relaxer import OneShotRelaxer
    from e3relax_ase.structures import INFO_CORRECTION_RATIO
    from e3relax_ase.training.pairs import load_pairs

    torch.set_num_threads(1)
    name = read_registry()["default"]
    with open(ROOT / "checkpoints" / "cards" / name / "per_structure.csv") as handle:
        errors = {row["id"]: (float(row["coord_mae"]), float(row["dummy_coord_mae"])) for row in csv.DictReader(handle)}
    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    relaxer = OneShotRelaxer("default", device="cpu", dtype="float32")
    inputs = []
    for k in range(len(pairs)):
        s = slice(pairs.offsets[k], pairs.offsets[k + 1])
        inputs.append(Atoms(pairs.numbers[s], positions=pairs.pos_unrelaxed[s], cell=pairs.cell_unrelaxed[k], pbc=True))
    results = relaxer.relax_many(inputs, errors="return", batch_size=64)
    ratio, error, dummy = [], [], []
    for k, result in enumerate(results):
        if isinstance(result, Atoms) and np.isfinite(result.info.get(INFO_CORRECTION_RATIO, np.nan)):
            ratio.append(result.info[INFO_CORRECTION_RATIO])
            error.append(errors[str(pairs.ids[k])][0])
            dummy.append(errors[str(pairs.ids[k])][1])
    ratio, error, dummy = map(np.asarray, (ratio, error, dummy))
    spearman = float(np.corrcoef(rank(ratio), rank(error))[0, 1])
    table = []
    for threshold in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, np.quantile(ratio, 0.8), np.quantile(ratio, 0.9)):
        flagged = ratio > threshold
        table.append({
            "threshold": float(threshold), "flagged_fraction": float(flagged.mean()),
            "mean_error_flagged": float(error[flagged].mean()) if flagged.any() else None,
            "mean_error_rest": float(error[~flagged].mean()) if (~flagged).any() else None,
        })
    summary = {"command": "python benchmarks/calibrate_confidence.py", "checkpoint": name, "n": int(len(ratio)),
               "spearman_ratio_vs_error": spearman,
               "spearman_ratio_vs_dummy_error": float(np.corrcoef(rank(ratio), rank(dummy))[0, 1]),
               "ratio_quantiles": {q: float(np.quantile(ratio, q)) for q in (0.1, 0.5, 0.9)}, "thresholds": table}
    (ROOT / "benchmarks" / "results" / "confidence_calibration.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
