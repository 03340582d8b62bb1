"""Hypothesis strategies for random crystals, and an independent oracle for refusals.

Used by tests/product/test_fuzz.py. A drawn crystal is a :class:`Fuzzed`: an ASE ``Atoms`` plus the
defect that was planted in it (if any). The strategy covers

* lattices: lengths 2-30 Å, angles 20-150 degrees (any valid triple; nearly coplanar cells
  now and then; left-handed cells, whose flipped vector makes angles up to 160), scaled to a density drawn log-uniformly between 4 and
  80 Å^3 per atom (or left as drawn); randomly oriented;
* periodicity: mostly 3D, often slabs (pbc [T, T, F] with 0-20 Å of vacuum), now and then
  slabs along another axis or wires (pbc [T, F, F]); vacuum vectors need not be perpendicular;
* sizes: 1-500 atoms, most small (``SIZE_BUCKETS``), so 10,000 structures run in minutes;
* positions: a jittered grid (jitter 0 gives symmetric, tie-rich structures), random points
  pushed apart to a drawn minimum distance, plain uniform points (often overlapping), or,
  for small cells, coordinates drawn one by one by hypothesis (so they shrink well, and
  include exact cell faces and atoms outside the cell); some atoms moved to other periodic
  images;
* species: drawn from the checkpoint's elements (``allowed_elements``);
* defects that validation must refuse: two atoms closer than 0.5 Å (0 Å included), an atom
  on top of another's periodic image, an element the checkpoint does not know (Z = 0 at
  least), a NaN position, a per-atom array of the wrong length, an atom 10^3-10^9 Å out along
  a vacuum axis; and an atom put as far from the others as the cell allows (refused only when
  the brute-force ``oracle_problem`` finds it isolated).

Large structures take their coordinates from a numpy generator seeded by hypothesis (drawing
1,500 floats one by one would overrun hypothesis's buffer); everything that decides the kind
of structure is drawn by hypothesis, so failing examples still shrink.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from hypothesis import strategies as st

from e3relax_ase.testing import random_rotation

# Common elements of inorganic crystals (Z), for checkpoints whose metadata lists none.
COMMON_ELEMENTS = (
    1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
    29, 30, 31, 32, 33, 34, 35, 37, 38, 39, 40, 41, 42, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53,
    55, 56, 57, 58, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83,
)  # fmt: skip

# (share in percent, smallest, largest atom count): most structures are small.
SIZE_BUCKETS = ((70, 1, 8), (24, 9, 32), (5, 33, 128), (1, 129, 500))

MIN_LENGTH, MAX_LENGTH = 2.0, 30.0  # Å
MIN_ANGLE, MAX_ANGLE = 20.0, 150.0  # degrees
DEFECTS = ("close-pair", "image-overlap", "isolated", "foreign-element", "nan-position", "bad-array", "far-out")


class Fuzzed:
    """A drawn crystal: the structure, and the defect planted in it (None: none planted).

    Not a dataclass: hypothesis prints a falsifying example through ``__repr__``, which
    gives every number needed to rebuild the structure.
    """

    def __init__(self, atoms: Atoms, defect: str | None, layout: str):
        self.atoms = atoms
        self.defect = defect
        self.layout = layout  # how the positions were made, for hypothesis events

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        a = self.atoms
        return (
            f"Fuzzed(defect={self.defect!r}, layout={self.layout!r}, numbers={a.numbers.tolist()!r}, "
            f"positions={a.positions.tolist()!r}, cell={a.cell.array.tolist()!r}, pbc={a.pbc.tolist()!r})"
        )


def allowed_elements(info, config) -> tuple[int, ...]:
    """The elements a checkpoint accepts: its metadata ``elements``, else the common ones it holds."""
    listed = info.metadata.get("elements")
    if listed:
        return tuple(sorted(int(z) for z in listed))
    return tuple(z for z in COMMON_ELEMENTS if z <= config.max_atomic_number)


def accepted_numbers(info, config) -> frozenset[int]:
    """Every atomic number validation lets through for this checkpoint (its documented rule)."""
    listed = info.metadata.get("elements")
    if listed:
        return frozenset(int(z) for z in listed)
    return frozenset(range(1, int(config.max_atomic_number) + 1))


def cell_from_parameters(lengths, angles) -> np.ndarray:
    """Rows a, b, c from lengths (Å) and angles alpha, beta, gamma (degrees); a along x."""
    a, b, c = lengths
    alpha, beta, gamma = np.radians(angles)
    cx = c * math.cos(beta)
    cy = c * (math.cos(alpha) - math.cos(beta) * math.cos(gamma)) / math.sin(gamma)
    cz = math.sqrt(max(c * c - cx * cx - cy * cy, 0.0))  # 0 for a coplanar triple
    return np.array([[a, 0.0, 0.0], [b * math.cos(gamma), b * math.sin(gamma), 0.0], [cx, cy, cz]])


def heights(cell: np.ndarray) -> np.ndarray:
    """Distance between opposite faces along each axis, Å (0 for a flat cell)."""
    volume = abs(np.linalg.det(cell))
    areas = [np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    return np.array([volume / area if area > 0 else 0.0 for area in areas])


@st.composite
def atom_counts(draw, max_atoms: int = 500) -> int:
    """1..max_atoms, weighted by ``SIZE_BUCKETS`` (shrinks towards one atom)."""
    ticket = draw(st.integers(0, 99))
    for share, low, high in SIZE_BUCKETS:
        if ticket < share and low <= max_atoms:
            return draw(st.integers(low, min(high, max_atoms)))
        ticket -= share
    return draw(st.integers(1, max_atoms))


@st.composite
def lattices(draw, n_atoms: int, regular: bool = False):
    """(cell [3, 3], pbc [3], fill [3]): fill is the fraction of each axis the atoms occupy.

    ``regular`` keeps away from coplanar cells (for equivariance tests).
    """
    alpha = draw(st.floats(MIN_ANGLE, MAX_ANGLE))
    beta = draw(st.floats(MIN_ANGLE, MAX_ANGLE))
    # Any gamma strictly between these makes a valid (non-coplanar) triple.
    low = max(MIN_ANGLE, abs(alpha - beta))
    high = min(MAX_ANGLE, alpha + beta, 360.0 - alpha - beta)
    if regular or draw(st.integers(0, 19)) > 0:
        u = draw(st.floats(0.05, 0.95))
    else:  # now and then right at the edge: a coplanar or nearly coplanar cell
        u = draw(st.floats(0.0, 0.05) | st.floats(0.95, 1.0))
    gamma = low + u * (high - low)
    lengths = np.array([draw(st.floats(MIN_LENGTH, MAX_LENGTH)) for _ in range(3)])
    cell = cell_from_parameters(lengths, (alpha, beta, gamma))

    periodicity = draw(st.sampled_from(["3d"] * 6 + ["slab"] * 3 + ["slab-other-axis", "wire"]))
    pbc = np.ones(3, dtype=bool)
    if periodicity == "slab":
        pbc[2] = False
    elif periodicity == "slab-other-axis":
        pbc[draw(st.integers(0, 1))] = False
    elif periodicity == "wire":
        pbc[1:] = False

    if draw(st.integers(0, 9)) > 0:  # usually: scale the cell to a physical density
        volume_per_atom = math.exp(draw(st.floats(math.log(4.0), math.log(80.0))))
        volume = abs(np.linalg.det(cell))
        if volume > 1e-9:
            scale = (n_atoms * volume_per_atom / volume) ** (1.0 / 3.0)
            lengths = np.clip(np.linalg.norm(cell, axis=1) * scale, MIN_LENGTH, MAX_LENGTH)
            cell = cell / np.linalg.norm(cell, axis=1)[:, None] * lengths[:, None]

    fill = np.ones(3)
    for axis in np.flatnonzero(~pbc):  # vacuum: atoms fill part of the axis, the cell grows
        vacuum = draw(st.floats(0.0, 20.0))
        height = heights(cell)[axis]
        if height < 2.0:  # a (nearly) flat cell: stretching it by (height + vacuum) / height
            continue  # would throw atoms 1e6 Å out, which crashes the neighbour search (see test_fuzz)
        fill[axis] = height / (height + vacuum)
        cell[axis] = cell[axis] / fill[axis]
    if draw(st.booleans()):  # left-handed: documented as accepted
        cell[draw(st.integers(0, 2))] *= -1.0
    if draw(st.booleans()):
        cell = cell @ random_rotation(np.random.default_rng(draw(st.integers(0, 2**32 - 1)))).T
    return cell, pbc, fill


def _grid_fractional(rng, n_atoms, cell, fill, jitter):
    """n_atoms distinct points of a grid matched to the cell's shape, jittered."""
    h = np.maximum(heights(cell) * fill, 1e-3)
    spacing = (np.prod(h) / n_atoms) ** (1.0 / 3.0)
    counts = np.maximum(1, np.round(h / spacing)).astype(int)
    while np.prod(counts) < n_atoms:
        counts[np.argmax(h / counts)] += 1
    chosen = rng.choice(int(np.prod(counts)), size=n_atoms, replace=False)
    index = np.stack(np.unravel_index(chosen, counts), axis=1)
    fractional = (index + 0.5 + jitter * rng.uniform(-0.5, 0.5, size=(n_atoms, 3))) / counts
    return fractional * fill


def _pushed_apart(rng, n_atoms, cell, pbc, fill, min_distance):
    """Uniform points, then atoms closer than ``min_distance`` moved elsewhere (a few rounds)."""
    from e3relax_ase.geometry.validation import neighbor_pairs

    fractional = rng.uniform(0.0, 1.0, size=(n_atoms, 3)) * fill
    for _ in range(30):
        if n_atoms == 1 or heights(cell)[pbc].min() < 0.3:  # nothing to push, or too many images
            break
        receivers, senders, _ = neighbor_pairs(fractional @ cell, cell, pbc, min_distance)
        crowded = np.unique(np.maximum(receivers, senders))
        if len(crowded) == 0:
            break
        fractional[crowded] = rng.uniform(0.0, 1.0, size=(len(crowded), 3)) * fill
    return fractional


@st.composite
def crystals(draw, elements, accepted=None, max_atoms: int = 500, defects: bool = True, regular: bool = False) -> Fuzzed:
    """A random crystal (module docstring).

    Args:
        elements: atomic numbers to draw species from.
        accepted: every atomic number the checkpoint accepts (``accepted_numbers``); the
            "foreign-element" defect draws outside it. Default: ``elements``.
        max_atoms: most atoms before any defect is added.
        defects: plant, now and then, a defect validation must refuse.
        regular: only layouts meant to pass validation (equivariance tests): no uniform
            overlapping points, no coplanar cells.
    """
    n_atoms = draw(atom_counts(max_atoms))
    cell, pbc, fill = draw(lattices(n_atoms, regular=regular))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layouts = ["grid", "grid", "pushed", "pushed"] + ([] if regular else ["uniform"])
    if n_atoms <= 6:
        layouts.append("drawn")
    layout = draw(st.sampled_from(layouts))
    if layout == "grid":
        jitter = draw(st.sampled_from([0.0, 0.05, 0.3, 0.8]))
        fractional = _grid_fractional(rng, n_atoms, cell, fill, jitter)
    elif layout == "pushed":
        volume_per_atom = abs(np.linalg.det(cell)) * np.prod(fill) / n_atoms
        factor = draw(st.floats(0.4, 0.8))
        fractional = _pushed_apart(rng, n_atoms, cell, pbc, fill, max(0.55, factor * volume_per_atom ** (1 / 3)))
    elif layout == "uniform":
        fractional = rng.uniform(0.0, 1.0, size=(n_atoms, 3)) * fill
    else:  # drawn by hypothesis: exact faces, corners and points outside the cell included
        coordinate = st.floats(0.0, 1.0) if regular else st.floats(-1.5, 2.5)
        fractional = np.array([[draw(coordinate) for _ in range(3)] for _ in range(n_atoms)])
    if draw(st.integers(0, 4)) == 0:  # some atoms written in other periodic images
        shifts = rng.integers(-3, 4, size=(n_atoms, 3)) * (rng.uniform(size=(n_atoms, 1)) < 0.5)
        fractional = fractional + shifts * pbc
    positions = fractional @ cell

    kinds = draw(st.integers(1, 4)) if len(elements) > 1 else 1
    palette = [draw(st.sampled_from(elements)) for _ in range(kinds)]
    numbers = np.array([palette[0]] * n_atoms if kinds == 1 else rng.choice(palette, size=n_atoms), dtype=int)
    if n_atoms <= 6 and kinds > 1:
        numbers = np.array([draw(st.sampled_from(palette)) for _ in range(n_atoms)], dtype=int)
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if draw(st.integers(0, 4)) == 0:
        atoms.set_initial_magnetic_moments(rng.uniform(-2, 2, size=n_atoms))

    defect = draw(st.sampled_from([None] * 4 + list(DEFECTS))) if defects else None
    if defect == "far-out" and pbc.all():
        defect = "close-pair"  # needs a vacuum axis
    if defect is not None:
        _plant(draw, rng, atoms, defect, accepted if accepted is not None else elements)
    return Fuzzed(atoms, defect, layout)


def _plant(draw, rng, atoms: Atoms, defect: str, accepted) -> None:
    """Add the defect to ``atoms`` in place."""
    n_atoms = len(atoms)
    host = draw(st.integers(0, n_atoms - 1))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    if defect == "close-pair":
        distance = draw(st.floats(0.0, 0.49))
        atoms.append(atoms[host])
        atoms.positions[-1] = atoms.positions[host] + distance * direction
    elif defect == "image-overlap":
        periodic = np.flatnonzero(atoms.pbc)
        shift = np.zeros(3)
        shift[draw(st.sampled_from(periodic.tolist()))] = draw(st.sampled_from([-2, -1, 1, 3]))
        atoms.append(atoms[host])
        atoms.positions[-1] = atoms.positions[host] + shift @ atoms.cell.array + draw(st.floats(0.0, 0.49)) * direction
    elif defect == "isolated":
        # A point as far from every atom as random sampling finds, pushed out along a vacuum
        # axis when there is one. Whether it really is isolated is for the oracle to say.
        cell = atoms.cell.array
        candidates = rng.uniform(0.0, 1.0, size=(256, 3))
        vacuum = np.flatnonzero(~atoms.pbc)
        if len(vacuum):
            candidates[:, vacuum] = 1.0 + draw(st.floats(0.0, 3.0))
        fractional = atoms.positions @ np.linalg.pinv(cell)  # pinv: the cell may be flat
        diff = candidates[:, None, :] - fractional[None, :, :]
        diff[..., atoms.pbc] -= np.round(diff[..., atoms.pbc])
        nearest = np.linalg.norm(diff @ cell, axis=-1).min(axis=1)
        atoms.append(atoms[host])
        atoms.positions[-1] = candidates[int(np.argmax(nearest))] @ cell
    elif defect == "foreign-element":
        atoms.numbers[host] = draw(st.sampled_from(sorted(set(range(119)) - set(accepted))))
    elif defect == "nan-position":
        atoms.positions[host, draw(st.integers(0, 2))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif defect == "far-out":  # more than 1,000 Å out along a vacuum axis: refused before searching
        axis = draw(st.sampled_from(np.flatnonzero(~atoms.pbc).tolist()))
        cell = atoms.cell.array
        normal = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
        normal *= np.sign(np.dot(normal, cell[axis])) / np.linalg.norm(normal)
        atoms.append(atoms[host])
        atoms.positions[-1] = atoms.positions[host] + 10 ** draw(st.floats(3.01, 9.0)) * normal
    elif defect == "bad-array":  # as if edited by hand: ASE itself would refuse a wrong length
        atoms.arrays["initial_magmoms"] = np.zeros(n_atoms + draw(st.sampled_from([-1, 1, 5])))


# --- an independent judge of the distance checks ------------------------------------------------


def brute_force_distances(atoms: Atoms, cutoff: float, max_vectors: float = 3e6):
    """Every pair distance below ``cutoff`` by brute force over periodic images (numpy only).

    Independent of the neighbour-list libraries validation uses. Returns (receiver [m],
    distance [m]) with each atom's own zero-shift self pair excluded, or None when the
    structure is non-finite, flat, or would need more than ``max_vectors`` candidate vectors.
    """
    cell = atoms.cell.array
    positions = atoms.positions
    pbc = atoms.pbc
    if not (np.isfinite(positions).all() and np.isfinite(cell).all()):
        return None
    lengths = np.linalg.norm(cell, axis=1)
    if abs(np.linalg.det(cell)) < 1e-3 * np.prod(np.maximum(lengths, 1e-9)):
        return None
    h = heights(cell)
    # |f_i + k_i| * h_i <= |vector| < cutoff, with f_i in [-0.5, 0.5) after wrapping.
    reach = [math.ceil(cutoff / h[i] + 0.5) if pbc[i] else 0 for i in range(3)]
    n_atoms = len(atoms)
    if n_atoms * n_atoms * np.prod([2.0 * r + 1 for r in reach]) > max_vectors:
        return None
    images = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
    fractional = positions @ np.linalg.inv(cell)
    diff = fractional[None, :, :] - fractional[:, None, :]  # [i, j, 3]: j seen from i
    diff[..., pbc] -= np.floor(diff[..., pbc] + 0.5)
    receivers, distances = [], []
    for image in images:
        vectors = (diff + image) @ cell
        d = np.sqrt((vectors**2).sum(-1))
        if not image.any():
            np.fill_diagonal(d, np.inf)
        i, j = np.nonzero(d < cutoff)
        receivers.append(i)
        distances.append(d[i, j])
    return np.concatenate(receivers), np.concatenate(distances)


def oracle_problem(atoms: Atoms, cutoff: float, min_distance: float) -> str | None:
    """What a brute-force search says validation must refuse, or None.

    Returns "close" when two atoms (or an atom and its image) are clearly closer than
    ``min_distance``, "isolated" when an atom clearly has no neighbour within ``cutoff``,
    "unknown" when the structure is too large, too dense or too flat to search cheaply (or
    has non-finite numbers), None when neither problem is present. Margins of 1e-6 Å keep
    borderline distances out of the verdict.
    """
    found = brute_force_distances(atoms, cutoff + 1e-6)
    if found is None:
        return "unknown"
    receivers, distances = found
    if len(distances) and distances.min() < min_distance - 1e-6:
        return "close"
    if (np.bincount(receivers, minlength=len(atoms)) == 0).any():
        return "isolated"
    return None


def oracle_clear(atoms: Atoms, cutoff: float) -> dict | None:
    """Facts that could contradict a distance refusal, or None when the search is too large.

    {"closest": shortest pair distance (Å, inf if none within the cutoff), "lonely": atoms
    with no neighbour closer than cutoff - 1e-6 Å}.
    """
    found = brute_force_distances(atoms, cutoff - 1e-6)
    if found is None:
        return None
    receivers, distances = found
    return {
        "closest": float(distances.min()) if len(distances) else math.inf,
        "lonely": np.flatnonzero(np.bincount(receivers, minlength=len(atoms)) == 0),
    }
