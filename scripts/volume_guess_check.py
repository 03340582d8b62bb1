"""How far the distillation inputs' volumes are from the relaxed ones, against a guess from
per-element volumes (fitted on the distilled train split) and against the geometric mean of
the two: median and 90th percentile of |ln(V_relaxed / V_guess)| on the val and test splits,
per seed source.

    python scripts/volume_guess_check.py     (needs .gpu/distill/inputs.npz.info.json.gz)

Only kept pairs are seen (their volume ratio is within [0.5, 2] by construction), so this
measures the bulk of the distribution, not the 1,024 relaxations the volume filter dropped.
"""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e3relax_ase.training.pairs import load_pairs  # noqa: E402


def volumes(pairs):
    return np.abs(np.linalg.det(pairs.cell_unrelaxed)), np.abs(np.linalg.det(pairs.cell_relaxed))


def composition_matrix(pairs, index):
    matrix = np.zeros((len(pairs), len(index)))
    for k in range(len(pairs)):
        for z in pairs.numbers[pairs.offsets[k] : pairs.offsets[k + 1]]:
            if z in index:
                matrix[k, index[z]] += 1
    return matrix


def main():
    data = ROOT / "data" / "sevennet0_distilled"
    sidecar = json.load(gzip.open(ROOT / ".gpu" / "distill" / "inputs.npz.info.json.gz", "rt"))
    train = load_pairs(data / "train.npz")
    elements = np.unique(train.numbers)
    index = {int(z): i for i, z in enumerate(elements)}
    _, v_train = volumes(train)
    # Non-negative per-element volumes; rows scaled by 1/V so relative errors weigh equally.
    per_element, _ = nnls(composition_matrix(train, index) / v_train[:, None], np.ones(len(train)))
    print(f"per-element volumes fitted on {len(train)} train pairs, {len(elements)} elements")
    print("split  source   pairs   input median / p90   per-element median / p90   geometric mean median / p90")
    for split in ("val", "test"):
        pairs = load_pairs(data / f"{split}.npz")
        v_input, v_relaxed = volumes(pairs)
        seen = np.array([set(pairs.numbers[pairs.offsets[k] : pairs.offsets[k + 1]].tolist()) <= index.keys() for k in range(len(pairs))])
        guess = composition_matrix(pairs, index) @ per_element
        source = np.array([sidecar[i]["source"] for i in pairs.ids])
        for name in ["all"] + sorted(set(source)):
            mask = seen & ((source == name) if name != "all" else True)
            old = np.abs(np.log(v_relaxed[mask] / v_input[mask]))
            new = np.abs(np.log(v_relaxed[mask] / guess[mask]))
            mean = np.abs(np.log(v_relaxed[mask] / np.sqrt(v_input[mask] * guess[mask])))
            print(f"{split:5s}  {name:8s} {mask.sum():5d}   {np.median(old):.3f} / {np.quantile(old, 0.9):.3f}"
                  f"          {np.median(new):.3f} / {np.quantile(new, 0.9):.3f}"
                  f"          {np.median(mean):.3f} / {np.quantile(mean, 0.9):.3f}")


if __name__ == "__main__":
    main()
