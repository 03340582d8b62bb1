"""Checking a CIF's own site list before its structure is trusted.

ASE's CIF reader builds the crystal from the ``_atom_site`` rows and the symmetry operations,
and merges rows that land on the same site (within 1e-3 in fractional coordinates): silently
when the file has an occupancy column (most have), with a warning otherwise. A file with a
duplicated row thus came out with fewer atoms than it lists, and the overlap check of
validation never saw the duplicate. Rows that share a site with partial occupancies are a
disordered structure, of which the reader keeps one species: the relaxer needs an ordered
crystal. Both are refused here, naming the rows.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

SAME_SITE = 1e-3  # fractional | rows closer than this are one site (the tolerance ASE merges at)
FULL_OCCUPANCY = 1.0 - 1e-3  # an occupancy below this is partial


class DuplicateSitesError(ValueError):
    """A CIF block whose site list has duplicated, overlapping or partially occupied sites."""


def check_sites(text: str) -> None:
    """Refuse a CIF block whose rows share sites or are partially occupied.

    Args:
        text: one CIF data block.

    Raises:
        DuplicateSitesError: naming the rows (by label and row number of the ``_atom_site`` loop).
    """
    from ase.io.cif import parse_cif

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = [block for block in parse_cif(io.StringIO(text)) if block.has_structure()]
    if not blocks:
        return
    block = blocks[0]
    raw = block.get_unsymmetrized_structure()  # one atom per row, as written
    n_rows = len(raw)
    labels = [str(label) for label in block.get("_atom_site_label", raw.get_chemical_symbols())]
    occupancies = _occupancies(block.get("_atom_site_occupancy"), n_rows)
    partial = [k for k in range(n_rows) if occupancies[k] < FULL_OCCUPANCY]
    scaled = raw.get_scaled_positions(wrap=True)
    spacegroup = block.get_spacegroup(True) if block.get_cell().rank == 3 else None
    for i in range(n_rows):
        orbit = _orbit(spacegroup, scaled[i])  # [n_images, 3]
        others = scaled[i + 1 :]
        if not len(others):
            break
        diff = others[:, None, :] - orbit[None, :, :]
        diff -= np.rint(diff)
        shared = np.flatnonzero(np.all(np.abs(diff) < SAME_SITE, axis=2).any(axis=1))
        if len(shared):
            j = i + 1 + int(shared[0])
            kind = "the same site (a duplicated row), which a reader merges into one atom"
            if occupancies[i] + occupancies[j] <= 1.0 + 1e-3 and (occupancies[i] < FULL_OCCUPANCY or occupancies[j] < FULL_OCCUPANCY):
                kind = (
                    f"one disordered site (occupancies {occupancies[i]:g} and {occupancies[j]:g}), of which a reader keeps "
                    "one species; order the structure first"
                )
            raise DuplicateSitesError(f"sites {labels[i]} and {labels[j]} (rows {i + 1} and {j + 1} of _atom_site) are {kind}")
    if partial:
        k = partial[0]
        raise DuplicateSitesError(
            f"site {labels[k]} (row {k + 1} of _atom_site) is partially occupied ({occupancies[k]:g}; {len(partial)} such sites): "
            "the relaxer needs an ordered structure"
        )


def _occupancies(column, n_rows: int) -> list[float]:
    """The occupancy of each row (1 where the file gives none or '?')."""
    if column is None:
        return [1.0] * n_rows
    values = []
    for value in column:
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(1.0)
    return values + [1.0] * (n_rows - len(values))


def _orbit(spacegroup, point: np.ndarray) -> np.ndarray:
    """The images of ``point`` under the block's symmetry operations (the point alone without)."""
    if spacegroup is None:
        return point[None, :]
    rotations, translations = zip(*spacegroup.get_symop())
    return (np.array(rotations) @ point + np.array(translations)) % 1.0
