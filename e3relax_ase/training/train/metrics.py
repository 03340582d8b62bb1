"""Evaluation metrics (METHOD.md, paper section 4.9), always reported next to the Dummy baseline.

Dummy returns the input unchanged, so its metrics are those of the unrelaxed structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch

from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.training.train.loss import align_to_target


class MatcherSettings(TypedDict):
    """Tolerances of pymatgen's StructureMatcher (its keyword arguments)."""

    ltol: float
    stol: float
    angle_tol: float


# StructureMatcher settings of the paper.
MATCHER_SETTINGS: MatcherSettings = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}

# Names of the per-structure errors (``structure_errors``), as metrics.json, log.csv, the
# training state and the per-structure CSV carry them; the Dummy baseline's get DUMMY_PREFIX.
COORD_MAE = "coord_mae"
COORD_MAE_PAPER = "coord_mae_paper"
CELL_SHAPE = "cell_shape"
VOLUME_ABS = "volume_abs"
METRIC_NAMES = (COORD_MAE, COORD_MAE_PAPER, CELL_SHAPE, VOLUME_ABS)
DUMMY_PREFIX = "dummy_"


def structure_errors(
    positions_pred: torch.Tensor,
    cell_pred: torch.Tensor,
    positions_target: torch.Tensor,
    cell_target: torch.Tensor,
    batch: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-structure errors of a batch (vectorised; no loop over crystals).

    Args:
        positions_pred, positions_target: [n_atoms, 3] Å.
        cell_pred, cell_target: [n_graphs, 3, 3] rows.
        batch: [n_atoms].

    Returns:
        Dict of [n_graphs] tensors: ``coord_mae`` (Å: each atom on the image of the true cell
        nearest its target, as in PACD, then the crystal's rigid translation removed, since a
        uniform translation of a crystal means nothing and DFT codes deform the cell about an
        arbitrary origin), ``coord_mae_paper`` (Å, image alignment only, the paper's figure),
        ``cell_shape`` (Å^2, Frobenius norm of G_pred - G_true with G = L L^T),
        ``volume_abs`` (Å^3, |det L_pred - det L_true|).
    """
    n_graphs = cell_target.shape[0]
    displacement = align_to_target(positions_pred, positions_target, cell_target, batch) - positions_target
    coord_paper = scatter_mean(displacement.abs().mean(-1), batch, n_graphs)
    rigid = scatter_mean(displacement, batch, n_graphs)[batch]
    coord = scatter_mean((displacement - rigid).abs().mean(-1), batch, n_graphs)
    metric_pred = cell_pred @ cell_pred.transpose(-1, -2)
    metric_true = cell_target @ cell_target.transpose(-1, -2)
    shape = torch.linalg.matrix_norm(metric_pred - metric_true)
    volume = (torch.linalg.det(cell_pred) - torch.linalg.det(cell_target)).abs()
    return {COORD_MAE: coord, COORD_MAE_PAPER: coord_paper, CELL_SHAPE: shape, VOLUME_ABS: volume}


def structures_match(numbers: np.ndarray, positions_a: np.ndarray, cell_a: np.ndarray, positions_b: np.ndarray, cell_b: np.ndarray) -> bool:
    """pymatgen StructureMatcher (ltol 0.2, stol 0.3, angle_tol 5) between two crystals."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Lattice, Structure

    matcher = StructureMatcher(**MATCHER_SETTINGS)
    # pymatgen takes atomic numbers for species (documented), but its annotation lists species objects only.
    a = Structure(Lattice(cell_a), numbers, positions_a, coords_are_cartesian=True)  # type: ignore[arg-type]
    b = Structure(Lattice(cell_b), numbers, positions_b, coords_are_cartesian=True)  # type: ignore[arg-type]
    return bool(matcher.fit(a, b))


def match_rate(numbers_list: Sequence[np.ndarray], pred: Sequence[tuple], target: Sequence[tuple]) -> float:
    """Fraction of crystals whose prediction matches the relaxed structure.

    Args:
        numbers_list: per crystal, atomic numbers.
        pred, target: per crystal, (positions [n, 3], cell [3, 3]).
    """
    if not numbers_list:
        return float("nan")
    hits = [structures_match(n, p[0], p[1], t[0], t[1]) for n, p, t in zip(numbers_list, pred, target)]
    return float(np.mean(hits))


def summarize(errors: dict[str, torch.Tensor | np.ndarray]) -> dict[str, float]:
    """Mean over structures of each per-structure error."""
    return {name: float(np.mean(np.asarray(torch.as_tensor(values).detach().cpu()))) for name, values in errors.items()}
