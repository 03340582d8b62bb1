"""Write a crystal in the network's canonical form, and map predictions back.

The network is not invariant to which periodic image an atom is written in (its lattice
features are built from centred positions) nor to the choice of lattice basis (the three
lattice nodes are the basis vectors). So every input is
  1. Niggli-reduced (3D-periodic crystals only): cell_reduced = transform @ cell, with
     ``transform`` an integer unimodular matrix;
  2. wrapped into the reduced cell along periodic axes (fractional coordinates in
     [-tol, 1 - tol), so an atom on a cell face is placed consistently under rounding noise);
and the prediction is mapped back onto the caller's basis and onto the caller's periodic
images: an atom written at wrapped + n @ cell_reduced comes back at predicted + n @ predicted_reduced_cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e3relax_ase.geometry.niggli import niggli_transforms

WRAP_TOLERANCE = 1e-8  # fractional; see module docstring


@dataclass
class CanonicalForm:
    """A crystal written canonically, with what is needed to undo it."""

    positions: np.ndarray  # [n_atoms, 3] wrapped into the reduced cell, Å
    cell: np.ndarray  # [3, 3] reduced cell (rows), Å
    transform: np.ndarray  # [3, 3] int, cell_reduced = transform @ cell_input
    image_shift: np.ndarray  # [n_atoms, 3] int, input = wrapped + image_shift @ cell_reduced

    def restore(self, positions_pred: np.ndarray, cell_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map a prediction made in canonical form back to the caller's basis and images.

        Args:
            positions_pred: [..., n_atoms, 3] predicted positions (canonical images).
            cell_pred: [..., 3, 3] predicted reduced cell.

        Returns:
            (positions [..., n_atoms, 3], cell [..., 3, 3]) in the caller's basis.
        """
        positions = np.array(positions_pred, dtype=np.result_type(positions_pred, cell_pred), copy=True)
        moved = self.image_shift.any(axis=1)
        if moved.any():
            positions[..., moved, :] += image_translation(self.image_shift[moved], cell_pred[..., None, :, :])
        cell = np.linalg.solve(self.transform.astype(cell_pred.dtype), cell_pred)
        return positions, cell


def image_translation(image_shift: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``image_shift @ cell`` row by row, written out: n0 a + n1 b + n2 c.

    Elementwise, so each atom's translation depends on its own shift and cell only, whatever
    else is in the array: ``restore`` of one crystal and ``predict.restore_all`` of a batch
    give the same bits (a matrix product's kernel may change with the number of rows). Only
    atoms written outside the canonical image are moved: the others come back exactly as
    predicted (no sign flip of an exact 0.0, no NaN from 0 times a non-finite cell).

    Args:
        image_shift: [m, 3] integers.
        cell: [..., m, 3, 3] (or broadcastable), the cell of each atom's crystal, rows.
    """
    shift = image_shift.astype(cell.dtype)
    return shift[:, 0:1] * cell[..., 0, :] + shift[:, 1:2] * cell[..., 1, :] + shift[:, 2:3] * cell[..., 2, :]


def reduce_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Integer matrix T with T @ cell Niggli-reduced; the identity unless periodic in 3D.

    T is the operation of ASE's ``niggli_reduce_cell`` (``e3relax_ase.geometry.niggli``, which
    tests/geometry/test_niggli.py checks against it). ``reduce_cells`` does many cells at once.

    Raises:
        ValueError: the reduction did not finish (a pathological cell).
    """
    if not np.all(pbc):
        return np.eye(3, dtype=np.int64)
    transforms, converged = niggli_transforms(np.asarray(cell, dtype=np.float64)[None])
    if not converged[0]:
        raise ValueError("Niggli reduction not done in the allowed steps (a pathological cell)")
    return _unimodular(transforms[0])


def reduce_cells(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``reduce_cell`` of many 3D-periodic cells in one vectorised reduction.

    Args:
        cells: [n, 3, 3] cells of full rank, rows are lattice vectors.

    Returns:
        (transforms [n, 3, 3] int64, ok [n] bool); where ``ok`` is False ``reduce_cell``
        raises for that cell, and its transform is not to be used.
    """
    transforms, converged = niggli_transforms(cells)
    unimodular = np.abs(np.rint(np.linalg.det(transforms.astype(np.float64)))) == 1 if len(transforms) else converged
    return transforms, converged & unimodular


def _unimodular(transform: np.ndarray) -> np.ndarray:
    transform = np.asarray(transform).astype(np.int64)
    if round(abs(np.linalg.det(transform))) != 1:
        raise ValueError("cell reduction produced a non-unimodular transform")
    return transform


def canonicalize(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, reduce: bool = True) -> CanonicalForm:
    """Reduce the cell and wrap the atoms (see module docstring).

    Args:
        positions: [n_atoms, 3] Å.
        cell: [3, 3] rows are lattice vectors.
        pbc: [3] bool.
        reduce: Niggli-reduce 3D-periodic cells.

    Returns:
        The canonical form.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    transform = reduce_cell(cell, pbc) if reduce else np.eye(3, dtype=np.int64)
    return wrap_into(positions, transform @ cell, transform, pbc)


def wrap_into(positions: np.ndarray, cell_reduced: np.ndarray, transform: np.ndarray, pbc: np.ndarray) -> CanonicalForm:
    """Wrap float64 ``positions`` into ``cell_reduced`` along periodic axes (module docstring)."""
    fractional = np.linalg.solve(cell_reduced.T, positions.T).T
    image_shift = np.floor(fractional + WRAP_TOLERANCE).astype(np.int64)
    image_shift[:, ~pbc] = 0
    wrapped = positions - image_shift @ cell_reduced
    return CanonicalForm(wrapped, cell_reduced, transform, image_shift)
