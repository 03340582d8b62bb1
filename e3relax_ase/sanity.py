"""Checks on every prediction, and a per-structure signal of when refinement is advisable.

Sanity (``check_prediction``): a prediction is flagged when it holds NaN/inf, when two atoms
come closer than ``SANE_MIN_DISTANCE``, when the volume changes by more than the factors in
``SANE_VOLUME_RATIO``, when det(cell) vanishes or changes sign (the ASE rule "det > 0", written
for left-handed inputs too), or when a vacuum lattice vector moved.

Confidence (``confidence``): the network refines the structure layer by layer; the size of
its LAST layer's correction, ``last_correction`` (Å, the largest non-affine atom displacement
from layer T-1 to T), tells how far from settled the prediction is. Refinement is advised when
it exceeds ``REFINE_ADVISED_CORRECTION``. Measured on the shipped checkpoint over the 982 valid
NREL DFT test structures (benchmarks/calibrate_confidence.py and the note in
benchmarks/results/confidence_calibration.json): the rank correlation of last_correction with
the actual coordinate error is 0.79 (the input's own error, unknown at inference, only 0.70);
at 0.1 Å half the structures are flagged, with mean error 0.43 Å against 0.077 Å for the rest,
and 93 % of the worst fifth are flagged. A cell still changing in the last layer (strain above
``REFINE_ADVISED_STRAIN``) is flagged too; on that test set this adds under 1 % of structures. The relative share of the last layer
(``correction_ratio`` = max(d_last / d_total, s_last / s_total), still reported) correlates
negatively with error (-0.16) and is not used for the advice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SANE_MIN_DISTANCE = 0.5  # Å | same floor as input validation
SANE_VOLUME_RATIO = (0.5, 2.0)  # predicted / input volume outside this is flagged
REFINE_ADVISED_CORRECTION = 0.1  # Å | last layer's atom correction above this advises refinement (measured, see above)
REFINE_ADVISED_STRAIN = 0.015  # last layer's strain |F - I| above this advises refinement too
MIN_DISPLACEMENT = 0.01  # Å | below this total displacement the ratio's atom term is 0
MIN_STRAIN = 0.002  # below this total strain the ratio's cell term is 0
SEARCH_RADIUS_MAX = 6.0  # Å | largest radius closest_pair searches at (then filters to min_distance)
_BORDER = 1e-12  # relative | distances this close to min_distance are left to the search at min_distance


@dataclass
class SanityReport:
    """Outcome of the sanity checks on one prediction."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    min_distance: float = math.nan  # Å, shortest pair in the prediction (inf: none under the floor)
    volume_ratio: float = math.nan  # predicted / input volume


@dataclass
class Confidence:
    """How settled one prediction is."""

    max_displacement: float  # Å | largest non-affine atom displacement, input -> prediction
    max_strain: float  # largest |F - I| entry, input -> prediction
    correction_ratio: float  # last layer's share of the total correction, in [0, inf)
    refine_advised: bool
    last_correction: float = math.nan  # Å | largest non-affine atom move made by the last layer


def check_prediction(
    positions,
    cell,
    pbc,
    cell_input,
    min_distance: float = SANE_MIN_DISTANCE,
    *,
    positions_input=None,
    closest_input: float | None = None,
) -> SanityReport:
    """Run the sanity checks on one predicted structure.

    Args:
        positions: [n_atoms, 3] predicted positions, Å.
        cell: [3, 3] predicted cell (rows), Å.
        pbc: [3] bool.
        cell_input: [3, 3] the input cell, Å.
        min_distance: shortest acceptable pair distance, Å.
        positions_input, closest_input: optional, the input positions (same atom images as
            ``positions``) and a lower bound on every input pair distance, periodic images
            included (Å). With them the neighbour search for close pairs is skipped where
            :func:`no_close_pairs` proves there is none; the report is the same.

    Returns:
        A :class:`SanityReport` (``ok`` False with the problems listed).
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(cell))):
        return SanityReport(False, ["prediction contains NaN or infinite values"])
    problems = []
    det_input = float(np.linalg.det(cell_input))
    det = float(np.linalg.det(cell))
    ratio = det / det_input
    if det * det_input <= 0 or abs(det) <= 1e-6 * float(np.prod(np.linalg.norm(cell, axis=1))):
        problems.append(f"det(cell) vanished or changed sign ({det_input:.4g} -> {det:.4g} Å^3)")
        return SanityReport(False, problems, volume_ratio=ratio)
    low, high = SANE_VOLUME_RATIO
    if not low <= ratio <= high:
        problems.append(f"volume changed by a factor {ratio:.3g} (outside [{low}, {high}])")
    for axis in np.flatnonzero(~pbc):
        if not np.allclose(cell[axis], cell_input[axis], rtol=1e-9, atol=1e-9):
            problems.append(f"vacuum lattice vector {axis} changed")
    if closest_input is not None and positions_input is not None and no_close_pairs(
        positions, cell, positions_input, cell_input, closest_input, min_distance
    ):
        return SanityReport(not problems, problems, math.inf, ratio)  # what an empty search gives
    found = closest_pair(positions, cell, pbc, min_distance)
    if found is None:
        return SanityReport(not problems, problems, math.inf, ratio)
    closest, i, j = found
    problems.append(f"atoms {i} and {j} are {closest:.3f} Å apart (< {min_distance} Å)")
    return SanityReport(False, problems, closest, ratio)


def closest_pair(positions, cell, pbc, min_distance: float) -> tuple[float, int, int] | None:
    """The closest pair under ``min_distance``, as the neighbour search at ``min_distance`` reports it.

    That search (:func:`closest_pair_searched`) bins the cell into boxes ``min_distance``
    wide, so it costs time in proportion to volume / min_distance^3: 29 ms for 20 atoms in a
    4 x 4 x 60 Å slab box, 7 ms in a 3 x 3 x 3000 Å wire, against 0.2 ms for either here. This
    searches at a radius where the boxes hold about one atom each, (volume / n_atoms)^(1/3)
    clipped to [min_distance, ``SEARCH_RADIUS_MAX``], and keeps the pairs under
    ``min_distance``. vesin computes a pair's distance from its two atoms and its lattice shift
    alone, whatever the radius, so the kept pairs are the same pairs with the same distances,
    in another order. Two cases could still differ, and they are searched at ``min_distance``
    instead: a distance within 1e-12 (relative) of ``min_distance`` (vesin compares squared
    distances, this sees their rounded roots), and a tie for the closest between different
    atom pairs (the search order, which depends on the radius, picks one of them).
    tests/test_sanity_search.py checks both give the same answer on awkward cells.

    Returns:
        (distance Å, i, j) with i <= j, or None when no pair is closer than ``min_distance``.
    """
    from e3relax_ase.validation import neighbor_pairs

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
    from e3relax_ase.validation import neighbor_pairs

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


def _displacement(positions_a, cell_a, positions_b, cell_b) -> float:
    """Largest non-affine displacement (Å) from structure a to b: fractional change in b's cell."""
    fractional_a = np.linalg.solve(cell_a.T, positions_a.T).T
    fractional_b = np.linalg.solve(cell_b.T, positions_b.T).T
    moves = (fractional_b - fractional_a) @ cell_b  # [n_atoms, 3]
    return float(np.sqrt((moves**2).sum(axis=1)).max()) if len(moves) else 0.0


def _strain(cell_a, cell_b) -> float:
    """Largest entry of |F - I|, with F the deformation taking cell a to cell b."""
    return float(np.abs(np.linalg.solve(cell_a, cell_b) - np.eye(3)).max())


def confidence(positions_layers, cell_layers, positions_input, cell_input) -> Confidence:
    """The refinement signal of one prediction (module docstring).

    Args:
        positions_layers: [T, n_atoms, 3] every layer's positions, Å.
        cell_layers: [T, 3, 3] every layer's cell, Å.
        positions_input: [n_atoms, 3] Å.
        cell_input: [3, 3] Å.

    Returns:
        A :class:`Confidence`; non-finite predictions get ratio inf and refinement advised.
    """
    positions_layers = np.asarray(positions_layers, dtype=np.float64)
    cell_layers = np.asarray(cell_layers, dtype=np.float64)
    if not (np.all(np.isfinite(positions_layers[-1])) and np.all(np.isfinite(cell_layers[-1]))):
        return Confidence(math.nan, math.nan, math.inf, True)
    try:
        d_total = _displacement(positions_input, cell_input, positions_layers[-1], cell_layers[-1])
        s_total = _strain(cell_input, cell_layers[-1])
        if len(positions_layers) < 2:
            return Confidence(d_total, s_total, math.nan, False)
        d_last = _displacement(positions_layers[-2], cell_layers[-2], positions_layers[-1], cell_layers[-1])
        s_last = _strain(cell_layers[-2], cell_layers[-1])
    except np.linalg.LinAlgError:  # a singular predicted cell; sanity flags it
        return Confidence(math.nan, math.nan, math.inf, True)
    ratio = max(d_last / d_total if d_total > MIN_DISPLACEMENT else 0.0, s_last / s_total if s_total > MIN_STRAIN else 0.0)
    advised = d_last > REFINE_ADVISED_CORRECTION or s_last > REFINE_ADVISED_STRAIN
    return Confidence(d_total, s_total, ratio, advised, d_last)
