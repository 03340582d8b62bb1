"""Space groups from spglib's table of operations, and their Wyckoff positions found without a table.

The setting is the one spglib lists first for each number (unique axis b, origin choice 1,
hexagonal axes for R groups). How Wyckoff positions are found without a table of them: a
point of a Wyckoff position is left fixed (modulo the lattice) by its site-symmetry group, so
each position is a component of the fixed-point set of one operation, or of the intersection
of two operations' fixed sets (``(R - I) x = n - t`` for integer n, stacked for two
operations). Every component found is stored with the multiplicity of its generic point (the
size of that point's orbit in the conventional cell). The general position is the whole cell
with multiplicity = number of operations. Used by :mod:`.wyckoff`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from functools import cache

import numpy as np

logger = logging.getLogger(__name__)

_TOL = 1e-6
_SHIFTS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64)  # [27, 3]
# Rows: primitive vectors in conventional fractional coordinates (International Tables).
_PRIMITIVE_ROWS = {
    "P": np.eye(3),
    "A": np.array([[1, 0, 0], [0, 0.5, 0.5], [0, -0.5, 0.5]]),
    "B": np.array([[0.5, 0, 0.5], [0, 1, 0], [-0.5, 0, 0.5]]),
    "C": np.array([[0.5, 0.5, 0], [-0.5, 0.5, 0], [0, 0, 1]]),
    "I": np.array([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]),
    "F": np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
    "R": np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]]),
}


@dataclasses.dataclass(frozen=True)
class OrbitKind:
    """A set of equivalent points: ``origin + basis @ u`` (fractional, conventional cell)."""

    origin: np.ndarray  # [3]
    basis: np.ndarray  # [3, d] orthonormal, d = free parameters (0 = a fixed point)
    multiplicity: int  # orbit size of a generic point, conventional cell

    @property
    def n_free(self) -> int:
        return int(self.basis.shape[1])


@dataclasses.dataclass(frozen=True)
class SpaceGroupData:
    """Operations and Wyckoff orbit kinds of one space group in spglib's first setting."""

    number: int
    symbol: str
    centering: str  # P, A, B, C, I, F or R
    rotations: np.ndarray  # [n_ops, 3, 3] int, fractional
    translations: np.ndarray  # [n_ops, 3] fractional
    kinds: tuple  # OrbitKind, the general position first

    @property
    def n_ops(self) -> int:
        return len(self.rotations)

    @property
    def n_centering(self) -> int:
        return int(round(1.0 / abs(np.linalg.det(_PRIMITIVE_ROWS[self.centering]))))


def crystal_system(number: int) -> str:
    """Crystal system of space group ``number`` (1-230)."""
    for upper, name in ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"), (167, "trigonal"), (194, "hexagonal"), (230, "cubic")):
        if number <= upper:
            return name
    raise ValueError(f"space group number must be 1-230, got {number}")


@cache
def _first_hall_numbers() -> dict[int, int]:
    import spglib

    out: dict[int, int] = {}
    for hall in range(1, 531):
        kind = spglib.get_spacegroup_type(hall)
        assert kind is not None  # every Hall number 1-530 has one
        out.setdefault(int(kind.number), hall)
    return out


def orbit(group: SpaceGroupData, point: np.ndarray) -> np.ndarray:
    """Distinct images of a fractional point under the group, wrapped into [0, 1). [m, 3]"""
    images = np.einsum("kij,j->ki", group.rotations, point) + group.translations  # [n_ops, 3]
    images -= np.floor(images)
    diff = images[:, None, :] - images[None, :, :]
    diff -= np.round(diff)
    same = (np.abs(diff) < 1e-5).all(axis=2)  # [n_ops, n_ops]
    first = np.argmax(same, axis=1)  # index of the first image equal to each image
    return images[np.unique(first)]


def _fixed_components(a_rows: np.ndarray, b_all: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Solutions x of ``a_rows @ x = b`` for each right-hand side ``b`` in ``b_all`` that has one.

    Returns:
        [(particular solution [3], orthonormal null-space basis [3, d])].
    """
    u, s, vt = np.linalg.svd(a_rows)
    rank = int((s > 1e-8).sum())
    null = vt[rank:].T  # [3, 3 - rank]
    pinv = np.linalg.pinv(a_rows)
    x = b_all @ pinv.T  # [k, 3]
    ok = np.abs(x @ a_rows.T - b_all).max(axis=1) < 1e-8
    return [(x_k, null) for x_k in x[ok]]


def _conjugacy_representatives(rotations: np.ndarray, translations: np.ndarray) -> list[int]:
    """One operation per conjugacy class of the group (modulo lattice translations)."""
    n = len(rotations)
    inverse = np.round(np.linalg.inv(rotations)).astype(np.int64)  # [n, 3, 3]
    assigned = np.full(n, -1)
    reps = []
    for k in range(n):
        if assigned[k] >= 0:
            continue
        reps.append(k)
        # h g h^-1 = (S R S^-1, S t + u - S R S^-1 u) for every h = (S, u).
        rot = np.einsum("hij,jk,hkl->hil", rotations, rotations[k], inverse)
        trans = np.einsum("hij,j->hi", rotations, translations[k]) + translations - np.einsum("hij,hj->hi", rot, translations)
        same_rot = (rot[:, None] == rotations[None]).all(axis=(2, 3))  # [h, ops]
        diff = trans[:, None, :] - translations[None, :, :]
        same_t = (np.abs(diff - np.round(diff)) < _TOL).all(axis=2)
        assigned[np.flatnonzero((same_rot & same_t).any(axis=0))] = k
    return reps


def _on_component(points: np.ndarray, origin: np.ndarray, basis: np.ndarray) -> bool:
    """Whether any of ``points`` [m, 3] lies on ``origin + span(basis)`` modulo the lattice."""
    shifts = np.array(list(itertools.product(range(-2, 3), repeat=3)), dtype=np.float64)  # [125, 3]
    r = points[:, None, :] - origin + shifts[None]  # [m, 125, 3]
    r = r - (r @ basis) @ basis.T
    return bool((np.linalg.norm(r, axis=2) < 1e-5).any())


@cache
def space_group(number: int) -> SpaceGroupData:
    """Operations and Wyckoff orbit kinds of space group ``number`` (cached per process).

    Pairs of operations are searched with the first one taken from each conjugacy class
    only: if h maps a position's point to one fixed by a class representative, the
    position is found there.

    Raises:
        ValueError: for a number outside 1-230.
    """
    import spglib

    crystal_system(number)
    hall = _first_hall_numbers()[number]
    kind_of = spglib.get_spacegroup_type(hall)
    ops = spglib.get_symmetry_from_database(hall)
    assert kind_of is not None and ops is not None  # None only for a Hall number outside 1-530
    rotations = np.asarray(ops["rotations"], dtype=np.int64)
    translations = np.asarray(ops["translations"], dtype=np.float64)
    centering = kind_of.international_short[0]
    group = SpaceGroupData(number, kind_of.international_short, centering, rotations, translations, ())

    eye = np.eye(3)
    rank = [int(np.linalg.matrix_rank(r - eye)) for r in rotations]
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    has_fixed = []
    for k in range(len(rotations)):
        if rank[k] == 0:
            continue  # identity or a centring translation: no special points
        found = _fixed_components(rotations[k] - eye, _SHIFTS - translations[k])
        candidates += found
        if found and rank[k] < 3:
            has_fixed.append(k)
    pairs_b = np.concatenate([np.broadcast_to(_SHIFTS[:, None, :], (27, 27, 3)), np.broadcast_to(_SHIFTS[None, :, :], (27, 27, 3))], axis=2).reshape(-1, 6)
    for k1 in _conjugacy_representatives(rotations, translations):
        if k1 not in has_fixed:
            continue
        for k2 in has_fixed:
            if np.array_equal(rotations[k1], rotations[k2]):
                continue  # parallel fixed sets: their intersection is not lower-dimensional
            a = np.vstack([rotations[k1] - eye, rotations[k2] - eye])  # [6, 3]
            b = pairs_b - np.concatenate([translations[k1], translations[k2]])
            candidates += [c for c in _fixed_components(a, b) if c[1].shape[1] < 3 - max(rank[k1], rank[k2])]

    # Cheap exact de-duplication first (wrapped origin with the free directions projected out).
    unique: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for origin, basis in candidates:
        o = origin - np.floor(origin + _TOL)
        o = o - basis @ (basis.T @ o)
        key = (basis.shape[1], tuple(np.round(o, 5)), tuple(np.round((basis @ basis.T).ravel(), 5)))
        unique.setdefault(key, (origin, basis))

    generic = np.array([0.1372, 0.3619, 0.5841])
    kinds = [OrbitKind(np.zeros(3), np.eye(3), len(rotations))]
    for origin, basis in unique.values():
        d = basis.shape[1]
        points = orbit(group, origin + basis @ generic[:d])
        m = len(points)
        if m == len(rotations):
            continue  # a generic point of this component is a general position after all
        # The same Wyckoff position when a generic point maps onto a kind already kept.
        if any(kd.n_free == d and kd.multiplicity == m and _on_component(points, kd.origin, kd.basis) for kd in kinds):
            continue
        kinds.append(OrbitKind(origin - np.floor(origin), basis, m))
    kinds.sort(key=lambda kd: (-kd.multiplicity, -kd.n_free))
    return dataclasses.replace(group, kinds=tuple(kinds))
