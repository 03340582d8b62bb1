"""Vacuum along periodic axes: slabs built with ``periodic=True`` and molecules in a box.

The network reads a periodic axis as a bulk direction and predicts a new lattice vector for
it. A slab whose vacuum lies along a periodic axis had its vacuum vector tilted and rescaled;
a water molecule in a 10 Å box with ``pbc=True`` had its box reshaped, and both were marked
sane. Here, an axis counts as a vacuum axis when a slab of empty space at least ``min_gap``
thick (the network's cutoff: no graph edge crosses it) separates the atoms' periodic images
along it.

* Some, not all, periodic axes are vacuum axes (a slab, a wire): the network sees those axes
  as non-periodic, so their lattice vectors stay exactly as given, and a warning says so.
  The atoms are first moved by whole lattice vectors along such an axis so that they sit
  together, the gap across the cell boundary (a slab written across the boundary would
  otherwise be cut in two); the result is moved back to the caller's images.
* Every periodic axis is a vacuum axis: an isolated cluster or molecule in a box. It is
  refused, unless the caller allows clusters; then its box is kept (``relax_cell=False``)
  and a warning says the network was not made for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e3relax_ase.geometry.validation import InvalidStructureError


class ClusterError(InvalidStructureError):
    """An isolated cluster in a periodic box (refused unless clusters are allowed)."""


@dataclass
class VacuumLayout:
    """The vacuum axes of a structure and how its atoms were moved to keep them together.

    Attributes:
        axes: the periodic axes found to hold vacuum.
        gaps: the empty thickness along each of them, Å.
        pbc: the periodicity the network sees (vacuum axes False).
        positions: the atoms moved by whole lattice vectors along the vacuum axes, Å.
        translation: what was added to each atom's position, [n_atoms, 3] Å (subtract it
            from a prediction to return to the caller's images).
        cluster: every periodic axis holds vacuum.
    """

    axes: tuple
    gaps: tuple
    pbc: np.ndarray
    positions: np.ndarray
    translation: np.ndarray
    cluster: bool

    def describe(self) -> str:
        return ", ".join(f"{gap:.1f} Å along axis {axis}" for axis, gap in zip(self.axes, self.gaps))


def find_vacuum(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, min_gap: float) -> VacuumLayout | None:
    """The vacuum axes of a structure, or None when no periodic axis has a gap of ``min_gap``.

    Args:
        positions: [n_atoms, 3] Å.
        cell: [3, 3] rows are lattice vectors, Å (invertible; validation checks it later
            and this returns None for a cell it cannot invert).
        pbc: [3] bool.
        min_gap: the empty thickness that makes an axis a vacuum axis, Å.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if len(positions) == 0 or cell.shape != (3, 3) or pbc.shape != (3,) or not pbc.any():
        return None
    try:
        inverse = np.linalg.inv(cell)
    except np.linalg.LinAlgError:
        return None
    if not (np.all(np.isfinite(inverse)) and np.all(np.isfinite(positions))):
        return None
    # Plane spacing along axis k: 1 / |k-th column of the inverse| (the reciprocal vector).
    spacing = 1.0 / np.linalg.norm(inverse, axis=0)  # [3] Å
    if not np.any(pbc & (spacing >= min_gap)):
        return None  # no axis is even as wide as the gap (every bulk crystal of a few atoms)
    fractional = positions @ inverse  # [n_atoms, 3]
    wrapped = fractional - np.floor(fractional)
    ordered = np.sort(wrapped, axis=0)
    # Gaps between neighbouring atoms along each axis, the last one across the cell boundary.
    steps = np.diff(ordered, axis=0, append=ordered[:1] + 1.0)  # [n_atoms, 3]
    widest = np.argmax(steps, axis=0)  # [3]
    gap_fraction = steps[widest, np.arange(3)]
    axes = [k for k in range(3) if pbc[k] and gap_fraction[k] * spacing[k] >= min_gap]
    if not axes:
        return None
    shifts = np.zeros_like(fractional)
    for k in axes:
        # Put every atom in [cut - 1, cut), cut the middle of the gap: together, the gap
        # across the cell boundary.
        cut = ordered[widest[k], k] + gap_fraction[k] / 2
        w = wrapped[:, k]
        unwrapped = np.where(w < cut, w, w - 1.0) if cut < 1.0 else np.where(w >= cut - 1.0, w, w + 1.0)
        whole = np.rint(unwrapped - fractional[:, k])
        values, counts = np.unique(whole, return_counts=True)
        shifts[:, k] = whole - values[np.argmax(counts)]  # move as few atoms as possible
    translation = shifts @ cell
    network_pbc = pbc.copy()
    network_pbc[axes] = False
    return VacuumLayout(
        axes=tuple(axes),
        gaps=tuple(float(gap_fraction[k] * spacing[k]) for k in axes),
        pbc=network_pbc,
        positions=positions + translation,
        translation=translation,
        cluster=not network_pbc.any(),
    )
