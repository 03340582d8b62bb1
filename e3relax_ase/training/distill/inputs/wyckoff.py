"""Random symmetric crystals: a space group, Wyckoff orbits filled to a composition, a lattice.

Our own small sampler on spglib's table of space-group operations (the setting spglib lists
first for each number: unique axis b, origin choice 1, hexagonal axes for R groups), in place
of pyxtal: it adds no dependency (pyxtal pulls in pandas, networkx, pyocse, vasprun-xml and
psutil), and its output depends only on this code, spglib's table and numpy's generator, so an
input set is rebuilt bit for bit from its seed whatever pyxtal release is installed.

How Wyckoff positions are found without a table of them: a point of a Wyckoff position is left
fixed (modulo the lattice) by its site-symmetry group, so each position is a component of the
fixed-point set of one operation, or of the intersection of two operations' fixed sets
(``(R - I) x = n - t`` for integer n, stacked for two operations). Every component found is
stored with the multiplicity of its generic point (the size of that point's orbit in the
conventional cell). The general position is the whole cell with multiplicity = number of
operations. A crystal then is: per element, orbits whose multiplicities add up to the
element's count in the conventional cell, each at a random point of its component; a lattice
of the group's crystal system scaled to a volume guess; atoms no closer than a fraction of
their covalent-radius sums; and, for centred groups, the primitive cell (a quarter of an F
cell's atoms), so atom counts are those of the primitive cell.
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


def _reachable(counts_available: list[tuple[int, bool]], target: int) -> np.ndarray:
    """reachable[r]: r atoms can be made from the multiplicities (fixed points used at most once)."""
    reach = np.zeros(target + 1, dtype=bool)
    reach[0] = True
    for m, reusable in counts_available:
        if reusable:
            for r in range(m, target + 1):
                reach[r] |= reach[r - m]
        else:
            reach[m:] = reach[m:] | reach[: target + 1 - m].copy()
    return reach


def fill_orbits(group: SpaceGroupData, count: int, rng: np.random.Generator, used_fixed: set) -> list | None:
    """Orbit kinds whose multiplicities sum to ``count``, drawn at random.

    Larger orbits with more free parameters are preferred (weight = multiplicity x
    2^free parameters, general position x2 more), as in real crystals where most atoms sit on
    general or low-symmetry sites; many atoms on one line or plane also rarely fit without
    clashes. Fixed points (no free
    parameter) are used at most once per crystal (``used_fixed`` holds their indices).

    Returns:
        list of kind indices, or None if ``count`` cannot be made.
    """
    chosen: list[int] = []
    remaining = count
    used = set(used_fixed)
    while remaining > 0:
        avail = [(k, kd) for k, kd in enumerate(group.kinds) if kd.multiplicity <= remaining and not (kd.n_free == 0 and k in used)]
        reach_after = {}
        options, weights = [], []
        for k, kd in avail:
            rest = [(o.multiplicity, o.n_free > 0) for j, o in avail if not (o.n_free == 0 and j == k)]
            key = (kd.multiplicity, kd.n_free == 0)
            if key not in reach_after:
                reach_after[key] = _reachable(rest, remaining)[remaining - kd.multiplicity]
            if reach_after[key]:
                options.append(k)
                weights.append(kd.multiplicity * 2.0**kd.n_free * (2.0 if k == 0 else 1.0))
        if not options:
            return None
        w = np.asarray(weights) / np.sum(weights)
        k = int(options[int(rng.choice(len(options), p=w))])
        chosen.append(k)
        if group.kinds[k].n_free == 0:
            used.add(k)
        remaining -= group.kinds[k].multiplicity
    used_fixed |= used
    return chosen


def random_lattice(number: int, rng: np.random.Generator) -> np.ndarray:
    """Cell parameters ``[a, b, c, alpha, beta, gamma]`` of the group's crystal system, a ~ 1."""
    system = crystal_system(number)
    lengths = np.exp(rng.uniform(np.log(0.6), np.log(1.6), size=3))
    angles = np.array([90.0, 90.0, 90.0])
    if system == "triclinic":
        angles = rng.uniform(70.0, 110.0, size=3)
    elif system == "monoclinic":
        angles[1] = rng.uniform(90.0, 120.0)
    elif system == "tetragonal":
        lengths[1] = lengths[0]
    elif system in ("trigonal", "hexagonal"):
        lengths[1] = lengths[0]
        angles[2] = 120.0
    elif system == "cubic":
        lengths[:] = lengths[0]
    return np.concatenate([lengths, angles])


def to_primitive(group: SpaceGroupData, cell: np.ndarray, frac: np.ndarray, numbers: np.ndarray):
    """The primitive cell of a centred conventional cell (rows of cell = lattice vectors).

    Returns:
        (cell [3, 3] right-handed, Cartesian positions [n / n_centering, 3], numbers).

    Raises:
        RuntimeError: if the atoms do not reduce to exactly n / n_centering (a broken orbit).
    """
    rows = _PRIMITIVE_ROWS[group.centering]
    if group.centering == "P":
        return cell, frac @ cell, numbers
    prim_cell = rows @ cell
    if np.linalg.det(prim_cell) < 0:
        prim_cell = prim_cell[[1, 0, 2]]
    prim_frac = (frac @ cell) @ np.linalg.inv(prim_cell)
    prim_frac -= np.floor(prim_frac)
    diff = prim_frac[:, None, :] - prim_frac[None, :, :]
    diff -= np.round(diff)
    same = (np.abs(diff) < 1e-5).all(axis=2)
    keep = np.unique(np.argmax(same, axis=1))
    if len(keep) * group.n_centering != len(numbers):
        raise RuntimeError(f"{len(numbers)} atoms of group {group.number} reduced to {len(keep)}")
    return prim_cell, prim_frac[keep] @ prim_cell, numbers[keep]


def too_close(positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray, factor: float) -> bool:
    """Whether two atoms (periodic images included) are closer than ``factor`` x their covalent-radius sum."""
    from ase.data import covalent_radii

    from e3relax_ase.geometry.graph import periodic_pairs

    radii = covalent_radii[numbers]
    cutoff = factor * 2.0 * float(radii.max())
    dst, src, _, dist = periodic_pairs(positions, cell, np.ones(3, dtype=bool), cutoff)
    return bool(np.any(dist < factor * (radii[dst] + radii[src])))


def random_symmetric_crystal(
    composition: dict[int, int],
    number: int,
    volume_per_atom: dict[int, float] | None,
    rng: np.random.Generator,
    min_distance_factor: float = 0.7,
    attempts: int = 4,
):
    """A crystal of space group ``number`` with ``composition`` atoms in its primitive cell.

    Args:
        composition: ``{Z: atoms in the primitive cell}``; each count times the group's
            centring factor must be a sum of its Wyckoff multiplicities.
        number: space group, 1-230.
        volume_per_atom: ``{Z: Å^3}`` for the volume guess (``chemistry.atomic_volume``).
        rng: random generator.
        min_distance_factor: atoms closer than this x the covalent-radius sum are rejected.
        attempts: draws per orbit before the cell is enlarged by 15 % (three times at most).

    Returns:
        ``(ase.Atoms, record)`` with record ``{"space_group", "symbol", "sites": [[symbol,
        multiplicity, free parameters]], "volume_scale"}``, or ``(None, None)`` when the
        composition does not fit the group or no draw keeps atoms apart.
    """
    from ase import Atoms
    from ase.data import chemical_symbols
    from ase.geometry import cellpar_to_cell

    from e3relax_ase.training.distill.inputs.chemistry import atomic_volume

    group = space_group(number)
    used_fixed: set = set()
    sites = []  # (Z, kind index)
    for z in sorted(composition):
        kinds = fill_orbits(group, composition[z] * group.n_centering, rng, used_fixed)
        if kinds is None:
            return None, None
        sites += [(z, k) for k in kinds]
    n_prim = sum(composition.values())
    volume = sum(c * atomic_volume(z, volume_per_atom) for z, c in composition.items())
    cellpar = random_lattice(number, rng)
    base = cellpar_to_cell(cellpar)
    for enlarge in range(4):
        scale = 1.15**enlarge
        cell = base * (volume * group.n_centering * scale / abs(np.linalg.det(base))) ** (1.0 / 3.0)
        placed = _place_orbits(group, sites, cell, rng, min_distance_factor, attempts)
        if placed is None:
            continue
        frac_all, z_all = placed
        prim_cell, positions, prim_numbers = to_primitive(group, cell, frac_all, z_all)
        if len(prim_numbers) != n_prim:
            raise RuntimeError(f"group {number}: {len(prim_numbers)} atoms for {n_prim}")
        if too_close(positions, prim_cell, prim_numbers, min_distance_factor):
            continue
        order = np.argsort(prim_numbers, kind="stable")
        atoms = Atoms(numbers=prim_numbers[order], positions=positions[order], cell=prim_cell, pbc=True)
        record = {
            "space_group": number,
            "symbol": group.symbol,
            "sites": [[chemical_symbols[z], group.kinds[k].multiplicity // group.n_centering, group.kinds[k].n_free] for z, k in sites],
            "volume_scale": round(scale, 4),
        }
        return atoms, record
    return None, None


def _place_orbits(group: SpaceGroupData, sites: list, cell: np.ndarray, rng: np.random.Generator, factor: float, attempts: int):
    """Draw a point for each site's orbit, one orbit at a time, redrawing an orbit that clashes.

    Clashes are checked in the conventional cell over the 27 nearest lattice images (the
    primitive cell is checked exactly afterwards); drawing orbit by orbit keeps the work
    linear in the number of orbits instead of redrawing the whole crystal on every clash.

    Returns:
        (fractional positions [n, 3], numbers [n]) or None when an orbit finds no place.
    """
    from ase.data import covalent_radii

    shifts = _SHIFTS @ cell  # [27, 3]
    frac_placed = np.zeros((0, 3))
    z_placed = np.zeros(0, dtype=np.int64)
    order = sorted(range(len(sites)), key=lambda i: -group.kinds[sites[i][1]].multiplicity)
    for i in order:
        z, k = sites[i]
        kind = group.kinds[k]
        for _ in range(attempts):
            points = orbit(group, kind.origin + kind.basis @ rng.random(kind.n_free))
            if len(points) != kind.multiplicity:
                continue  # a special point hit by chance
            cart = points @ cell
            limit = factor * (covalent_radii[z] + covalent_radii[np.append(z_placed, np.full(len(points), z))])
            others = np.concatenate([frac_placed, points]) @ cell  # [n + m, 3]
            d = np.linalg.norm(cart[:, None, None, :] - others[None, :, None, :] - shifts[None, None], axis=3)
            d[np.arange(len(points)), len(z_placed) + np.arange(len(points)), 13] = np.inf  # the atom itself
            if (d.min(axis=2) >= limit[None, :]).all():
                frac_placed = np.concatenate([frac_placed, points])
                z_placed = np.append(z_placed, np.full(len(points), z))
                break
        else:
            return None
    return frac_placed, z_placed


def detected_space_group(atoms, symprec: float = 1e-3) -> int:
    """spglib's space group number of ``atoms`` (0 when spglib finds none)."""
    import spglib

    dataset = spglib.get_symmetry_dataset((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers), symprec=symprec)
    return int(dataset.number) if dataset is not None else 0
