"""Random symmetric crystals: a space group, Wyckoff orbits filled to a composition, a lattice.

Our own small sampler on spglib's table of space-group operations (the setting spglib lists
first for each number: unique axis b, origin choice 1, hexagonal axes for R groups), in place
of pyxtal: it adds no dependency (pyxtal pulls in pandas, networkx, pyocse, vasprun-xml and
psutil), and its output depends only on this code, spglib's table and numpy's generator, so an
input set is rebuilt bit for bit from its seed whatever pyxtal release is installed.

Space groups and their Wyckoff positions (each with the multiplicity of its generic point)
come from :mod:`.spacegroups`. A crystal then is: per element, orbits whose multiplicities add
up to the element's count in the conventional cell, each at a random point of its component; a
lattice of the group's crystal system scaled to a volume guess; atoms no closer than a fraction
of their covalent-radius sums; and, for centred groups, the primitive cell (a quarter of an F
cell's atoms), so atom counts are those of the primitive cell.
"""

from __future__ import annotations

import logging

import numpy as np

from e3relax_ase.training.distill.inputs.spacegroups import _PRIMITIVE_ROWS, _SHIFTS, SpaceGroupData, crystal_system, orbit, space_group

logger = logging.getLogger(__name__)


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
