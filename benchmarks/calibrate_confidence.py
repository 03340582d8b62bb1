"""Calibrate the refine-advised signal of the default checkpoint: which structures to flag.

A structure should be flagged when its prediction is among the worst: the target (issue 16)
is to flag at least 80 % of the fifth of structures with the largest coordinate error while
flagging at most 35 % of all. Each split is relaxed by ``OneShotRelaxer`` (the signals users
get: ``e3relax_last_correction``, ``e3relax_max_displacement``, ``e3relax_max_strain``, and
the last layer's strain) and evaluated by ``evaluate_checkpoint`` (the error). The thresholds
are chosen on the VALIDATION splits only (grid of quantiles, the rule "any signal above its
threshold", at most ``--max-flagged`` flagged on each split, best worst-split recall), then
reported on the test splits, which played no part in choosing them.

    python benchmarks/calibrate_confidence.py [--max-flagged 0.30] [--out FILE]

Writes JSON (command, machine, thresholds, recall/precision/flag rate per split) to
benchmarks/results/confidence_calibration_<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CALIBRATION = {"nrel_val": "data/nrel_zintl/val.npz", "distilled_v2_val": "data/sevennet0_distilled_v2/val.npz"}
REPORT = {"nrel_test": "data/nrel_zintl/test.npz", "distilled_v2_test": "data/sevennet0_distilled_v2/test.npz"}
SIGNALS = ("last_correction", "last_strain", "max_displacement", "max_strain")
WORST = 0.2  # the worst fifth by coordinate error


def signals_and_errors(path: str, checkpoint: str) -> dict:
    """Per structure of a pair file: the relaxer's signals and the evaluator's coordinate error."""
    from ase import Atoms

    from e3relax_ase.relax.relaxer import OneShotRelaxer, RelaxFailure
    from e3relax_ase.relax.sanity import _strain
    from e3relax_ase.training.data.pairs import load_pairs
    from e3relax_ase.training.train.evaluate import evaluate_checkpoint

    pairs = load_pairs(ROOT / path)
    with tempfile.TemporaryDirectory() as tmp:
        evaluate_checkpoint(checkpoint, ROOT / path, out_dir=tmp, match_sample=1)
        with open(Path(tmp) / "per_structure.csv") as handle:
            error = np.array([float(row["coord_mae"]) for row in csv.DictReader(handle)])
    relaxer = OneShotRelaxer(checkpoint, device="cpu", dtype="float32")
    inputs = [
        Atoms(
            pairs.numbers[pairs.offsets[k] : pairs.offsets[k + 1]],
            positions=pairs.pos_unrelaxed[pairs.offsets[k] : pairs.offsets[k + 1]],
            cell=pairs.cell_unrelaxed[k],
            pbc=pairs.pbc[k],
        )
        for k in range(len(pairs))
    ]
    values = {name: np.full(len(pairs), np.nan) for name in SIGNALS}
    for k, result in enumerate(relaxer.relax_many(inputs, errors="return", return_trajectory=True)):
        if isinstance(result, RelaxFailure):
            continue
        final, frames = result  # frames: the input, then every layer's structure
        values["last_correction"][k] = final.info["e3relax_last_correction"]
        values["max_displacement"][k] = final.info["e3relax_max_displacement"]
        values["max_strain"][k] = final.info["e3relax_max_strain"]
        values["last_strain"][k] = _strain(frames[-2].cell.array, frames[-1].cell.array)
    relaxer.close()
    return {"error": error, **values}


def flagged(data: dict, thresholds: dict) -> np.ndarray:
    out = np.zeros(len(data["error"]), dtype=bool)
    for name, threshold in thresholds.items():
        out |= np.nan_to_num(data[name], nan=np.inf) > threshold
    return out


def scores(data: dict, thresholds: dict) -> dict:
    valid = np.isfinite(data["max_displacement"])
    error = data["error"][valid]
    flags = flagged({k: v[valid] for k, v in data.items()}, thresholds)
    worst = error >= np.quantile(error, 1 - WORST)
    return {
        "n": int(valid.sum()),
        "flagged_share": float(flags.mean()),
        "recall_of_worst_fifth": float(flags[worst].mean()),
        "precision": float(worst[flags].mean()) if flags.any() else float("nan"),
        "mean_error_flagged": float(error[flags].mean()) if flags.any() else float("nan"),
        "mean_error_not_flagged": float(error[~flags].mean()) if (~flags).any() else float("nan"),
    }


def choose(calibration: dict, max_flagged: float) -> tuple[dict, dict]:
    """The thresholds with the best worst-split recall under the flag-rate limit."""
    quantiles = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01)
    pooled = {name: np.concatenate([d[name] for d in calibration.values()]) for name in SIGNALS}
    candidates = {name: sorted({float(np.nanquantile(pooled[name], q)) if q <= 1 else np.inf for q in quantiles}) for name in SIGNALS}
    best, best_key = None, None
    for combination in itertools.product(*(candidates[name] for name in SIGNALS)):
        thresholds = dict(zip(SIGNALS, combination))
        results = {split: scores(data, thresholds) for split, data in calibration.items()}
        if max(r["flagged_share"] for r in results.values()) > max_flagged:
            continue
        key = (min(r["recall_of_worst_fifth"] for r in results.values()), -max(r["flagged_share"] for r in results.values()))
        if best_key is None or key > best_key:
            best, best_key = (thresholds, results), key
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--max-flagged", type=float, default=0.30)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench_pipeline import result_header, write_result

    from e3relax_ase.io.checkpoint import load_checkpoint

    torch.set_num_threads(2)
    _, info = load_checkpoint(args.checkpoint)
    calibration = {split: signals_and_errors(path, args.checkpoint) for split, path in CALIBRATION.items()}
    report = {split: signals_and_errors(path, args.checkpoint) for split, path in REPORT.items()}
    thresholds, fitted = choose(calibration, args.max_flagged)
    results = {
        **result_header("cpu"),
        "checkpoint": info.name,
        "checkpoint_sha256": info.sha256,
        "rule": "refinement advised when any signal exceeds its threshold (inf: signal unused)",
        "thresholds": thresholds,
        "chosen_on": {split: {"data": CALIBRATION[split], **fitted[split]} for split in CALIBRATION},
        "reported_on": {split: {"data": REPORT[split], **scores(report[split], thresholds)} for split in REPORT},
        "rank_correlation_with_error": {
            split: {
                name: float(np.corrcoef(np.argsort(np.argsort(np.nan_to_num(data[name]))), np.argsort(np.argsort(data["error"])))[0, 1]) for name in SIGNALS
            }
            for split, data in {**calibration, **report}.items()
        },
    }
    path = write_result(results, args.out, f"confidence_calibration_{info.name}.json")
    print(path)
    for split, row in {**results["chosen_on"], **results["reported_on"]}.items():
        print(f"{split:20s} flagged {row['flagged_share']:.3f}  recall(worst 20%) {row['recall_of_worst_fifth']:.3f}  precision {row['precision']:.3f}")
    print("thresholds", thresholds)


if __name__ == "__main__":
    main()
