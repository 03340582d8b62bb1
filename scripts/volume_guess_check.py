"""How far the distillation inputs' volumes are from the relaxed ones, against a guess from
per-element volumes (fitted on the distilled train split) and against the geometric mean of
the two, and against the rule make-inputs applies with --element-volumes (the geometric mean for
compounds, the input volume for elemental cells): median and 90th percentile of
|ln(V_relaxed / V_guess)| on the val and test splits, per seed source.

    python scripts/volume_guess_check.py     (needs .gpu/distill/inputs.npz.info.json.gz)

Only kept pairs are seen (their volume ratio is within [0.5, 2] by construction), so this
measures the bulk of the distribution, not the 1,024 relaxations the volume filter dropped.
"""

import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e3relax_ase.training.data.pairs import load_pairs  # noqa: E402
from e3relax_ase.training.data.perturb import element_volume_guess, fit_element_volumes  # noqa: E402


def volumes(pairs):
    return np.abs(np.linalg.det(pairs.cell_unrelaxed)), np.abs(np.linalg.det(pairs.cell_relaxed))


def spread(v_relaxed, v_guess) -> str:
    error = np.abs(np.log(v_relaxed / v_guess))
    return f"{np.median(error):.3f} / {np.quantile(error, 0.9):.3f}"


def main():
    data = ROOT / "data" / "sevennet0_distilled"
    sidecar = json.load(gzip.open(ROOT / ".gpu" / "distill" / "inputs.npz.info.json.gz", "rt"))
    train = load_pairs(data / "train.npz")
    element_volumes = fit_element_volumes(train)
    print(f"per-element volumes fitted on {len(train)} train pairs, {len(element_volumes)} elements")
    print("split  source   pairs   input           per-element     geometric mean  rule (median / p90)")
    for split in ("val", "test"):
        pairs = load_pairs(data / f"{split}.npz")
        v_input, v_relaxed = volumes(pairs)
        numbers = [pairs.numbers[pairs.offsets[k] : pairs.offsets[k + 1]] for k in range(len(pairs))]
        guess = np.array([element_volume_guess(z, element_volumes) or np.nan for z in numbers])
        seen = np.isfinite(guess)
        compound = np.array([len(set(z.tolist())) > 1 for z in numbers])
        mean = np.sqrt(v_input * guess)
        rule = np.where(compound, mean, v_input)
        source = np.array([sidecar[i]["source"] for i in pairs.ids])
        for name in ["all"] + sorted(set(source)):
            m = seen & ((source == name) if name != "all" else True)
            print(
                f"{split:5s}  {name:8s} {m.sum():5d}   {spread(v_relaxed[m], v_input[m])}   "
                f"{spread(v_relaxed[m], guess[m])}   {spread(v_relaxed[m], mean[m])}   {spread(v_relaxed[m], rule[m])}"
            )


if __name__ == "__main__":
    main()
