"""Checks every input crystal must pass before it reaches the network.

Each failed check raises :class:`InvalidStructureError` with a one-line message that names the
structure and the problem. The checks, in order (docs/reliability.md has the full table):

1. atoms and per-atom arrays: at least one atom, every per-atom array of the same length;
2. finite numbers: no NaN or inf in positions or cell, no coordinate beyond ``MAX_COORDINATE``;
3. periodicity: at least one periodic axis (a molecule, pbc all False, is refused: the
   network predicts a lattice and needs one);
4. cell: every lattice vector non-zero and the volume |det(cell)| clearly non-zero. A
   left-handed cell (det < 0) is accepted as it is: the network only needs an invertible
   cell, and the prediction keeps the caller's basis, so its handedness too;
5. elements: every atomic number was seen in training (checkpoint metadata ``elements``),
   or lies in 1..max_atomic_number when the checkpoint does not list them;
6. cell shape: no two lattice vectors closer than ``MIN_CELL_ANGLE`` degrees to parallel,
   judged on the cell the network sees (Niggli-reduced when periodic in 3D, so a skewed but
   reducible cell passes);
7. size: the estimated number of graph edges fits the memory budget (``max_edges``); the
   estimate is made before the neighbour search, so a huge cell is refused without being
   searched;
8. distances: no two atoms (or an atom and its own periodic image) closer than
   ``min_distance``. The neighbour search runs on the crystal in the canonical form the
   network sees (``prepare_arrays``: reduced cell, wrapped atoms), the same pairs as the
   input as written, with distances equal to rounding (1e-15 Å); the relaxer builds the
   network's graph from that search instead of searching again;
9. neighbours: every atom has at least one neighbour within the cutoff, less
   ``keys.ISOLATION_MARGIN`` (a neighbour at the cutoff itself carries no weight, and rounding
   must not decide). A single atom in a periodic cell is fine when its own images are close
   enough.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from e3relax_ase.geometry.canonical import CanonicalForm, reduce_cell, wrap_into
from e3relax_ase.keys import ISOLATION_MARGIN, MIN_DISTANCE

MIN_CELL_ANGLE = 5.0  # degrees | lattice vectors closer than this to (anti)parallel are refused
MIN_VOLUME_FRACTION = 1e-6  # |det| / (|a| |b| |c|) below this is a degenerate (flat) cell
MAX_VACUUM_EXTENT = 1000.0  # Å | atoms spread wider than this along a vacuum axis are refused
MAX_COORDINATE = 1e8  # Å | farther out, float64 keeps a position only to ~1e-8 Å (1e15 Å: 0.1 Å)
MAX_PAIRS_SEARCHED = 50_000_000  # neighbour pairs a search may produce before it is refused


class InvalidStructureError(ValueError):
    """An input the relaxer refuses; the message names the structure and the problem."""


@dataclass
class StructureReport:
    """What validation learned about a structure that passed."""

    n_atoms: int
    n_edges: int  # estimated edges of the network's graph (K-capped neighbour count)
    min_distance: float  # Å, inf when the structure has no pair within the cutoff


@dataclass
class PreparedCrystal:
    """What validation computed on the way, for the network to reuse.

    The neighbour search of the distance checks runs on the crystal in canonical form (the
    form the network sees), so the relaxer can build the graph from the same search.
    """

    report: StructureReport
    form: CanonicalForm  # the form the pairs were searched in
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (receiver, sender, shift, distance): periodic_pairs(form, cutoff)


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """All pairs within ``cutoff`` (full list, periodic images included, true self pair excluded).

    Returns:
        (receiver i [n_pairs], sender j [n_pairs], distance [n_pairs] Å) as numpy arrays.
    """
    from e3relax_ase.geometry.neighbors import periodic_pairs

    receivers, senders, _, distances = periodic_pairs(
        np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool), cutoff
    )
    return receivers, senders, distances


def _fail(name: str, problem: str) -> None:
    raise InvalidStructureError(f"{name}: {problem}")


def _angles(cell: np.ndarray) -> list[float]:
    """Angles in degrees between lattice vectors (a, b), (a, c), (b, c)."""
    first, second = cell[[0, 0, 1]], cell[[1, 2, 2]]
    lengths = np.sqrt((cell * cell).sum(axis=1))
    cosine = (first * second).sum(axis=1) / (lengths[[0, 0, 1]] * lengths[[1, 2, 2]])
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))).tolist()


def estimate_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> float:
    """Neighbour pairs within the cutoff expected from the density alone (before any search).

    Along a vacuum axis the density is taken over the atoms' extent (plus 2 Å) instead of the
    cell height, so a slab in a tall box is not underestimated. A rough figure (a factor of
    about 2), used only to refuse absurd sizes before searching.
    """
    n_atoms = len(positions)
    volume = abs(float(np.linalg.det(cell)))
    for axis in np.flatnonzero(~np.asarray(pbc, dtype=bool)):
        normal = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
        normal /= np.linalg.norm(normal)
        height = abs(float(np.dot(cell[axis], normal)))
        extent = float(np.ptp(positions @ normal)) + 2.0
        volume *= extent / height
    return n_atoms * n_atoms / max(volume, 1e-12) * (4.0 / 3.0 * math.pi * cutoff**3)


def validate_arrays(numbers, positions, cell, pbc, **options) -> StructureReport:
    """Check one crystal given as arrays (see the module docstring for the checks).

    Args:
        numbers, positions, cell, pbc, **options: as :func:`prepare_arrays`.

    Returns:
        A :class:`StructureReport`.

    Raises:
        InvalidStructureError: naming the structure and the first problem found.
    """
    return prepare_arrays(numbers, positions, cell, pbc, **options).report


def prepare_arrays(
    numbers,
    positions,
    cell,
    pbc,
    *,
    name: str = "structure",
    cutoff: float = 6.0,
    max_neighbors: int = 50,
    elements=None,
    max_atomic_number: int = 118,
    min_distance: float = MIN_DISTANCE,
    max_edges: int | None = None,
    per_atom_arrays: dict | None = None,
    reduce: bool = True,
    transform: np.ndarray | None = None,
) -> PreparedCrystal:
    """Check one crystal (``validate_arrays``), keeping its canonical form and neighbour search for the network.

    The distance checks search the crystal in canonical form (``reduce``: Niggli-reduced when
    periodic in 3D, then wrapped), which holds the same pairs as the input as written; the
    distances agree to rounding (1e-15 Å).

    Args:
        numbers: [n_atoms] atomic numbers.
        positions: [n_atoms, 3] Å.
        cell: [3, 3] rows are lattice vectors, Å.
        pbc: [3] bool.
        name: how messages name the structure.
        cutoff: neighbour cutoff of the model, Å.
        max_neighbors: the model's neighbour cap K.
        elements: atomic numbers seen in training, or None for 1..max_atomic_number.
        max_atomic_number: the model's largest atomic number.
        min_distance: closest allowed pair distance, Å.
        max_edges: memory budget in graph edges, or None for no limit.
        per_atom_arrays: other per-atom arrays (name -> array) whose length must match.
        reduce: the canonical form Niggli-reduces 3D-periodic cells (the relaxer's
            ``reduce_cell``); the cell-shape check always judges the reduced cell.
        transform: the cell's Niggli transform if already computed (``canonical.reduce_cells``
            over a batch), used for a 3D-periodic cell instead of reducing it again.

    Returns:
        A :class:`PreparedCrystal`.

    Raises:
        InvalidStructureError: naming the structure and the first problem found.
    """
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    n_atoms = len(numbers)
    if n_atoms == 0:
        _fail(name, "has no atoms")
    if positions.shape != (n_atoms, 3):
        _fail(name, f"has {n_atoms} atomic numbers but positions of shape {positions.shape}")
    for key, values in (per_atom_arrays or {}).items():
        if len(values) != n_atoms:
            _fail(name, f"per-atom array {key!r} has {len(values)} entries for {n_atoms} atoms")
    if cell.shape != (3, 3) or pbc.shape != (3,):
        _fail(name, f"cell must be 3x3 and pbc 3 booleans, got {cell.shape} and {pbc.shape}")
    if not np.all(np.isfinite(positions)):
        _fail(name, f"has NaN or infinite positions (atoms {np.flatnonzero(~np.isfinite(positions).all(1))[:5].tolist()})")
    if not np.all(np.isfinite(cell)):
        _fail(name, "has a NaN or infinite cell")
    farthest = float(np.abs(positions).max())
    if farthest > MAX_COORDINATE:
        kept = f"where float64 keeps positions only to {np.spacing(farthest):.2g} Å"
        _fail(name, f"has an atom {farthest:.3g} Å from the origin, {kept}; wrap the atoms into the cell first (atoms.wrap())")
    if not pbc.any():
        _fail(name, "is not periodic (pbc all False, a molecule); E3Relax relaxes crystals, slabs and 2D materials")

    lengths = np.linalg.norm(cell, axis=1)
    if not lengths.any():
        _fail(name, "has no cell (all lattice vectors are zero)")
    for axis in np.flatnonzero(lengths < 1e-8):
        if pbc[axis]:
            _fail(name, f"has a zero lattice vector along periodic axis {axis}")
        _fail(name, f"has no lattice vector along vacuum axis {axis}; add vacuum, e.g. atoms.center(vacuum=10, axis={axis})")
    det = float(np.linalg.det(cell))
    if abs(det) <= MIN_VOLUME_FRACTION * float(np.prod(lengths)):
        _fail(name, f"has a degenerate cell (volume {det:.3g} Å^3, det(cell) ~ 0): its lattice vectors are coplanar")

    # Along a vacuum axis nothing wraps: an atom written 1e6 Å out makes the neighbour search
    # build a huge grid (vesin-torch dies with SIGFPE), so refuse before searching.
    vacuum_axes = np.flatnonzero(~pbc)
    if len(vacuum_axes):
        fractional = np.linalg.solve(cell.T, positions.T).T
        for axis in vacuum_axes:
            height = abs(det) / float(np.linalg.norm(np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])))
            extent = float(fractional[:, axis].max() - fractional[:, axis].min()) * height
            if extent > MAX_VACUUM_EXTENT:
                _fail(
                    name,
                    f"has atoms spread over {extent:.3g} Å along vacuum axis {axis} (> {MAX_VACUUM_EXTENT:g} Å); center them, e.g. atoms.center(axis={axis})",
                )

    allowed = _allowed(elements, max_atomic_number)
    bad = sorted(z for z in {int(z) for z in np.unique(numbers).tolist()} if z not in allowed)
    if bad:
        _fail(name, f"contains elements the checkpoint was not trained on (atomic numbers {bad})")

    seen = cell
    if not pbc.all():
        transform = None
    else:
        try:
            if transform is None:
                transform = reduce_cell(cell, pbc)
            seen = transform @ cell
        except Exception as exc:  # the reduction fails on pathological cells
            _fail(name, f"cell could not be Niggli-reduced ({exc})")
    angles = _angles(seen)
    if min(min(angles), 180.0 - max(angles)) < MIN_CELL_ANGLE:
        _fail(
            name,
            f"has an extremely skewed cell (lattice-vector angles {[round(a, 2) for a in angles]} degrees, < {MIN_CELL_ANGLE} from parallel)",
        )

    expected_pairs = estimate_pairs(positions, cell, pbc, cutoff)
    expected_edges = int(min(expected_pairs, n_atoms * max_neighbors))
    # The estimate is rough: refuse before searching only when it is far over the budget.
    if max_edges is not None and expected_edges > 2 * max_edges:
        _fail(name, f"is too large for the memory budget: about {expected_edges} graph edges for {n_atoms} atoms, budget {max_edges}")
    if expected_pairs > MAX_PAIRS_SEARCHED:
        _fail(name, f"is too large or too dense to search for neighbours (about {expected_pairs:.3g} pairs within {cutoff} Å)")

    # The canonical form, from the reduction just made (canonicalize's steps, so its bits).
    if reduce and transform is not None:
        form = wrap_into(positions, seen, transform, pbc)
    else:
        form = wrap_into(positions, cell, np.eye(3, dtype=np.int64), pbc)
    from e3relax_ase.geometry.neighbors import periodic_pairs

    pairs = periodic_pairs(form.positions, form.cell, pbc, cutoff)
    receivers, senders, _, distances = pairs
    closest = float(distances.min()) if len(distances) else math.inf
    if closest < min_distance:
        k = int(np.argmin(distances))
        i, j = sorted((int(receivers[k]), int(senders[k])))
        what = f"atom {i} is {closest:.3f} Å from its own periodic image" if i == j else f"atoms {i} and {j} are {closest:.3f} Å apart"
        _fail(name, f"{what} (< {min_distance} Å); overlapping atoms")
    counts = np.bincount(receivers, minlength=n_atoms)
    lonely = np.flatnonzero(counts == 0)  # the search stops at neighbors.graph_radius: cutoff - ISOLATION_MARGIN
    if len(lonely):
        _fail(
            name,
            f"atom {int(lonely[0])} has no neighbour within the {cutoff} Å cutoff (closer than {cutoff - ISOLATION_MARGIN:g} Å; {len(lonely)} isolated atoms)",
        )
    n_edges = int(np.minimum(counts, max_neighbors).sum())
    if max_edges is not None and n_edges > max_edges:
        _fail(name, f"is too large for the memory budget: {n_edges} graph edges for {n_atoms} atoms, budget {max_edges}")
    return PreparedCrystal(StructureReport(n_atoms=n_atoms, n_edges=n_edges, min_distance=closest), form, pairs)


def _allowed(elements, max_atomic_number: int):
    if elements:
        return _element_set(tuple(elements))
    return range(1, int(max_atomic_number) + 1)


@functools.lru_cache(maxsize=64)
def _element_set(elements: tuple) -> frozenset:
    return frozenset(int(z) for z in elements)


def validate_atoms(atoms, name: str | None = None, **kwargs) -> StructureReport:
    """Check an ASE ``Atoms`` (its per-atom arrays included); see :func:`validate_arrays`.

    Raises:
        InvalidStructureError: naming the structure and the first problem found.
    """
    return prepare_atoms(atoms, name, **kwargs).report


def prepare_atoms(atoms, name: str | None = None, **kwargs) -> PreparedCrystal:
    """:func:`prepare_arrays` for an ASE ``Atoms`` (its per-atom arrays included).

    Raises:
        InvalidStructureError: naming the structure and the first problem found.
    """
    name = name or structure_name(atoms)
    arrays = {key: value for key, value in atoms.arrays.items() if key not in ("numbers", "positions")}
    return prepare_arrays(atoms.arrays["numbers"], atoms.arrays["positions"], atoms.cell.array, atoms.pbc, name=name, per_atom_arrays=arrays, **kwargs)


def structure_name(atoms, index: int | None = None) -> str:
    """A readable name: ``info['name']`` or the formula, with the index in a batch."""
    label = atoms.info.get("name") if hasattr(atoms, "info") else None
    if not label:
        try:
            label = atoms.get_chemical_formula()
        except Exception:
            label = "?"
    return f"structure {index} ({label})" if index is not None else str(label)
