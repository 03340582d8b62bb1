"""Evaluate a checkpoint on a pair file: metrics next to Dummy, per-structure CSV, plots."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e3relax_ase.io.checkpoint import load_checkpoint
from e3relax_ase.training.data.families import FAMILIES, chemical_family
from e3relax_ase.training.data.pairs import load_pairs
from e3relax_ase.training.train.dataset import prepare_pairs
from e3relax_ase.training.train.metrics import (
    COORD_MAE,
    DUMMY_PREFIX,
    MATCHER_SETTINGS,
    METRIC_NAMES,
    VOLUME_ABS,
    structure_errors,
    structures_match,
)


@torch.no_grad()
def evaluate_checkpoint(checkpoint, data_path, out_dir=None, device="cpu", batch_size=64, match_sample: int = 500, seed: int = 0) -> dict:
    """Metrics of a checkpoint and of Dummy on every pair of a file.

    Args:
        checkpoint: name or path.
        data_path: pair file (npz).
        out_dir: if given, write ``per_structure.csv``, ``metrics.json`` and the PNG plots.
        match_sample: StructureMatcher is slow; the match rate uses this many random pairs
            (0 = all). The figure says how many it used.

    Returns:
        {"model": {...}, "dummy": {...}, "n_pairs": n, "match_sample": m, ...}
    """
    model, info = load_checkpoint(checkpoint, map_location=device)
    model = model.to(device)
    pairs = load_pairs(data_path)
    # Uncentred targets: coord_mae removes the rigid translation itself, coord_mae_paper must see it.
    data = prepare_pairs(pairs, model.config.cutoff, model.config.max_neighbors, center_targets=False).to(device)
    rows = []
    predictions = []
    for start in range(0, len(data), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(data)))
        graph, positions_target, cell_target = data.batch(indices)
        output = model(graph)
        positions_pred, cell_pred = output.positions[-1], output.cell[-1]  # the input's fractional centroid kept
        ours = structure_errors(positions_pred, cell_pred, positions_target, cell_target, graph.batch)
        dummy = structure_errors(graph.positions, graph.cell, positions_target, cell_target, graph.batch)
        bounds = np.concatenate([[0], np.cumsum(graph.n_atoms.cpu().numpy())])
        for local, k in enumerate(indices.tolist()):
            pair_atoms = slice(pairs.offsets[k], pairs.offsets[k + 1])
            row = {"id": str(pairs.ids[k]), "n_atoms": int(pairs.n_atoms[k]), "family": chemical_family(pairs.numbers[pair_atoms])}
            row.update({name: float(ours[name][local]) for name in METRIC_NAMES})
            row.update({DUMMY_PREFIX + name: float(dummy[name][local]) for name in METRIC_NAMES})
            row["volume_true"] = float(torch.linalg.det(cell_target[local]).abs())
            row["volume_pred"] = float(torch.linalg.det(cell_pred[local]).abs())
            row["volume_input"] = float(torch.linalg.det(graph.cell[local]).abs())
            rows.append(row)
            atoms = slice(bounds[local], bounds[local + 1])
            predictions.append(
                (
                    graph.numbers[atoms].cpu().numpy(),
                    (positions_pred[atoms].double().cpu().numpy(), cell_pred[local].double().cpu().numpy()),
                    (graph.positions[atoms].double().cpu().numpy(), graph.cell[local].double().cpu().numpy()),
                    (positions_target[atoms].double().cpu().numpy(), cell_target[local].double().cpu().numpy()),
                )
            )
    rng = np.random.default_rng(seed)
    sample = np.arange(len(rows)) if not match_sample or match_sample >= len(rows) else np.sort(rng.choice(len(rows), match_sample, replace=False))
    model_hits = [structures_match(predictions[k][0], *predictions[k][1], *predictions[k][3]) for k in sample]
    dummy_hits = [structures_match(predictions[k][0], *predictions[k][2], *predictions[k][3]) for k in sample]
    summary: dict[str, Any] = {
        "checkpoint": info.name or info.path,
        "checkpoint_sha256": info.sha256,
        "data": str(data_path),
        "n_pairs": len(rows),
        "match_sample": int(len(sample)),
        "matcher": MATCHER_SETTINGS,
        "model": {name: float(np.mean([r[name] for r in rows])) for name in METRIC_NAMES},
        "dummy": {name: float(np.mean([r[DUMMY_PREFIX + name] for r in rows])) for name in METRIC_NAMES},
    }
    summary["model"]["match_rate"] = float(np.mean(model_hits))
    summary["dummy"]["match_rate"] = float(np.mean(dummy_hits))
    summary["ratio_to_dummy"] = {name: summary["model"][name] / summary["dummy"][name] for name in METRIC_NAMES if summary["dummy"][name] > 0}
    summary["families"] = family_table(rows)
    if out_dir is not None:
        write_report(Path(out_dir), rows, summary)
    return summary


def family_table(rows: list[dict]) -> dict:
    """Per chemical family: pairs, mean coordinate and volume errors of model and Dummy, ratios."""
    table = {}
    for family in FAMILIES:
        members = [r for r in rows if r["family"] == family]
        if not members:
            continue
        entry: dict[str, float] = {"n_pairs": len(members)}
        for name in (COORD_MAE, VOLUME_ABS):
            model, dummy = float(np.mean([r[name] for r in members])), float(np.mean([r[DUMMY_PREFIX + name] for r in members]))
            entry.update({name: model, DUMMY_PREFIX + name: dummy, f"{name}_ratio": model / dummy if dummy > 0 else float("nan")})
        table[family] = entry
    return table


def write_report(out_dir: Path, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".per_structure.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_dir / "per_structure.csv")
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ours = [r[COORD_MAE] for r in rows]
    dummy = [r[DUMMY_PREFIX + COORD_MAE] for r in rows]
    bins = np.linspace(0, max(np.percentile(dummy, 99), 1e-3), 50).tolist()  # a list: hist is typed for sequences
    ax.hist(dummy, bins=bins, alpha=0.6, label=f"Dummy (mean {np.mean(dummy):.3f} Å)")
    ax.hist(ours, bins=bins, alpha=0.6, label=f"E3Relax-H2 (mean {np.mean(ours):.3f} Å)")
    ax.set_xlabel("coordinate MAE per structure (Å)")
    ax.set_ylabel("structures")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "coord_error_hist.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    true = np.array([r["volume_true"] for r in rows])
    ax.scatter(true, [r["volume_input"] for r in rows], s=4, alpha=0.4, label="input (Dummy)")
    ax.scatter(true, [r["volume_pred"] for r in rows], s=4, alpha=0.6, label="predicted")
    lim = [0, true.max() * 1.1]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("relaxed volume (Å³)")
    ax.set_ylabel("volume (Å³)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "volume_parity.png", dpi=120)
    plt.close(fig)
