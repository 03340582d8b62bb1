"""The close-pair searches behind the sanity checks: the closest pair under a distance, found
by a neighbour search at a radius that stays cheap in a large box (``closest_pair``) or at the
distance itself (``closest_pair_searched``, the reference), and the proof that no pair can be
that close, without a search (``no_close_pairs``)."""

from __future__ import annotations

import math

import numpy as np

SEARCH_RADIUS_MAX = 6.0  # Å | largest radius closest_pair searches at (then filters to min_distance)
_BORDER = 1e-12  # relative | distances this close to min_distance are left to the search at min_distance


def closest_pair(positions, cell, pbc, min_distance: float) -> tuple[float, int, int] | None:
    """The closest pair under ``min_distance``, as the neighbour search at ``min_distance`` reports it.

    That search (:func:`closest_pair_searched`) bins the cell into boxes ``min_distance`` wide,
    so it costs time in proportion to volume / min_distance^3: slow for a few atoms in a large
    box (a slab with vacuum, a wire), where the search here stays cheap. This searches at a
    radius where the boxes hold about one atom each, (volume / n_atoms)^(1/3) clipped to
    [min_distance, ``SEARCH_RADIUS_MAX``], and keeps the pairs under ``min_distance``. vesin
    computes a pair's distance from its two atoms and its lattice shift alone, whatever the
    radius, so the kept pairs are the same pairs with the same distances, in another order. Two
    cases could still differ, and they are searched at ``min_distance`` instead: a distance
    within 1e-12 (relative) of ``min_distance`` (vesin compares squared distances, this sees
    their rounded roots), and a tie for the closest between different atom pairs (the search
    order, which depends on the radius, picks one of them). tests/relax/test_sanity_search.py checks
    both give the same answer on awkward cells.

    Returns:
        (distance Å, i, j) with i <= j, or None when no pair is closer than ``min_distance``.
    """
    from e3relax_ase.geometry.validation import neighbor_pairs

    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    n_atoms = len(positions)
    volume = abs(float(np.linalg.det(cell)))
    radius = min((volume / max(n_atoms, 1)) ** (1.0 / 3.0), SEARCH_RADIUS_MAX)
    if not (math.isfinite(radius) and radius > min_distance):
        return closest_pair_searched(positions, cell, pbc, min_distance)
    receivers, senders, distances = neighbor_pairs(positions, cell, pbc, radius)
    near = distances < min_distance * (1.0 + _BORDER)
    if not near.any():  # every distance >= min_distance (1 + 1e-12): none passes d^2 < min_distance^2
        return None
    receivers, senders, distances = receivers[near], senders[near], distances[near]
    if np.any(distances >= min_distance * (1.0 - _BORDER)):  # on the border: let the search decide
        return closest_pair_searched(positions, cell, pbc, min_distance)
    closest = distances.min()
    tied = distances == closest
    pairs = {tuple(sorted(pair)) for pair in zip(receivers[tied].tolist(), senders[tied].tolist())}
    if len(pairs) > 1:  # which of them the search names depends on its order
        return closest_pair_searched(positions, cell, pbc, min_distance)
    i, j = pairs.pop()
    return float(closest), i, j


def closest_pair_searched(positions, cell, pbc, min_distance: float) -> tuple[float, int, int] | None:
    """:func:`closest_pair` by the neighbour search at ``min_distance`` itself (the reference)."""
    from e3relax_ase.geometry.validation import neighbor_pairs

    receivers, senders, distances = neighbor_pairs(positions, cell, pbc, min_distance)
    if not len(distances):
        return None
    k = int(np.argmin(distances))
    i, j = sorted((int(receivers[k]), int(senders[k])))
    return float(distances.min()), i, j


def no_close_pairs(positions, cell, positions_input, cell_input, closest_input: float, min_distance: float) -> bool:
    """True when no two atoms of the prediction can be closer than ``min_distance`` (a proof, no search).

    With F = cell_input^-1 cell (rows are lattice vectors) and u = positions - positions_input F
    the non-affine displacements, every pair vector of the prediction is v F + u_j - u_i for
    the input's pair vector v of the same atoms and lattice translation, so its length is at
    least sigma_min(F) |v| - 2 max |u| >= sigma_min(F) closest_input - 2 max |u|. False means
    "not proven" (then search); margins of 1e-6 cover rounding.
    """
    try:
        deformation = np.linalg.solve(cell_input, cell)
        smallest = float(np.linalg.svd(deformation, compute_uv=False)[-1])
    except np.linalg.LinAlgError:
        return False
    moves = positions - positions_input @ deformation
    largest = float(np.sqrt((moves * moves).sum(axis=1).max())) if len(moves) else 0.0
    bound = smallest * closest_input * (1.0 - 1e-9) - 2.0 * largest
    return bool(np.isfinite(bound) and bound > min_distance + 1e-6)
