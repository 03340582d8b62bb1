"""Reusable checks that a relaxer predicts from the crystal, not from how it is written.

Library code (not under tests/) so that every test, and users who fine-tune their own
variants of the network, check the same physics the same way. Each ``assert_*`` takes a
*predictor*: a function from crystals (``CrystalArrays``) to their relaxed (positions, cell),
in the caller's basis and atom images. ``network_predictor`` runs the network alone on the
crystal as written, ``pipeline_predictor`` the whole prediction path users get (canonical
form, network, mapping back). Run them in float64: the invariances hold to rounding, so
tolerances of 1e-8 Å separate a correct model from a broken one.

One crystal, one answer:
  - basis: a unimodular change of the lattice basis gives the same lattice and positions;
  - supercells: an integer supercell relaxes to the supercell of the relaxed cell;
  - translations: shifting the input (atoms across cell faces too) shifts the output by the
    strain-carried shift, ``shift @ cell_in^-1 @ cell_pred`` (the fractional centroid is kept);
  - periodic images: an atom written n lattice vectors away comes back n predicted lattice
    vectors away, also within 1e-15 ... 1e-6 (fractional) of a cell face;
  - rotations and reflections rotate/reflect the output; atom permutations permute it;
  - so a symmetric input keeps its space group (``assert_space_group_kept``; ``prototypes``
    lists symmetric crystals of every crystal system).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from e3relax_ase.config import ModelConfig
from e3relax_ase.geometry.crystal import CrystalArrays
from e3relax_ase.geometry.graph import CrystalGraph, build_graph
from e3relax_ase.nn.architectures import Network, build_model
from e3relax_ase.relax.predict import predict

# A small configuration for fast tests: every stage present, F and the bases shrunk.
TINY_CONFIG = ModelConfig(num_channels=16, num_layers=2, num_rbf=16, num_strain_channels=4, max_neighbors=24, output_init_scale=0.05)

Relaxed = tuple[np.ndarray, np.ndarray]  # (positions [n_atoms, 3], cell [3, 3]), Å
Predictor = Callable[[Sequence[CrystalArrays]], list[Relaxed]]


def random_rotation(rng: np.random.Generator, proper: bool = True) -> np.ndarray:
    """A uniformly random orthogonal matrix [3, 3]: a rotation (det +1), or with
    ``proper=False`` a rotation followed by a reflection (det -1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if not proper:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q


def random_unimodular(rng: np.random.Generator, max_entry: int = 2) -> np.ndarray:
    """A random integer matrix [3, 3] of determinant +-1 (a change of lattice basis)."""
    while True:
        transform = rng.integers(-max_entry, max_entry + 1, size=(3, 3))
        if abs(round(np.linalg.det(transform))) == 1:
            return transform


def random_crystal(rng: np.random.Generator, n_atoms: int = 6, elements=(3, 8, 14, 26), min_distance: float = 1.6, skew: float = 0.3) -> CrystalArrays:
    """A random triclinic crystal with atoms at least ``min_distance`` apart (periodic)."""
    for _ in range(1000):
        cell = np.diag(rng.uniform(3.5, 5.5, size=3)) + rng.uniform(-skew, skew, size=(3, 3)) * 3.0
        if np.linalg.det(cell) < 20.0:
            continue
        fractional: list[np.ndarray] = []
        for _ in range(200 * n_atoms):
            candidate = rng.uniform(0.02, 0.98, size=3)
            if not fractional or _min_periodic_distance(candidate, np.asarray(fractional), cell) >= min_distance:
                fractional.append(candidate)
            if len(fractional) == n_atoms:
                break
        if len(fractional) == n_atoms:
            positions = np.asarray(fractional) @ cell
            numbers = rng.choice(elements, size=n_atoms)
            return CrystalArrays(numbers=numbers, positions=positions, cell=cell, pbc=np.ones(3, dtype=bool))
    raise RuntimeError("could not place atoms; lower min_distance")


_IMAGES = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def _min_periodic_distance(candidate, fractional, cell) -> float:
    """Shortest distance from ``candidate`` [3] to any of ``fractional`` [m, 3] or their images."""
    diff = candidate - fractional
    diff -= np.round(diff)
    vectors = (diff[:, None, :] + _IMAGES[None]) @ cell  # [m, 27, 3]
    return float(np.sqrt((vectors**2).sum(-1).min()))


def tiny_model(seed: int = 0, config: ModelConfig = TINY_CONFIG, dtype=torch.float64) -> Network:
    """A randomly initialised small model with non-zero output heads, in float64."""
    torch.manual_seed(seed)
    return build_model(config).to(dtype).eval()


def graph_of(crystals: list[CrystalArrays], config: ModelConfig, dtype=torch.float64) -> CrystalGraph:
    """The batched graph of raw (not canonicalised) crystals."""
    return build_graph(
        [torch.as_tensor(c.numbers) for c in crystals],
        [torch.as_tensor(c.positions, dtype=dtype) for c in crystals],
        [torch.as_tensor(c.cell, dtype=dtype) for c in crystals],
        [torch.as_tensor(c.pbc) for c in crystals],
        config.cutoff,
        config.max_neighbors,
    )


# --- predictors -------------------------------------------------------------------------


def network_predictor(model: Network) -> Predictor:
    """The network alone, on the crystals exactly as written (no reduction, no wrapping), in
    the model's dtype: the invariances are the network's own."""
    dtype = next(model.parameters()).dtype

    def run(crystals: Sequence[CrystalArrays]) -> list[Relaxed]:
        with torch.no_grad():
            output = model(graph_of(list(crystals), model.config, dtype))
        positions = output.positions[-1].double().numpy()
        bounds = np.concatenate([[0], np.cumsum([len(c.numbers) for c in crystals])])
        return [(positions[bounds[k] : bounds[k + 1]], output.cell[-1, k].double().numpy()) for k in range(len(crystals))]

    return run


def pipeline_predictor(model: Network, dtype: torch.dtype = torch.float64) -> Predictor:
    """``predict``: the prediction path of the relaxer (canonical form, network, mapping back)."""

    def run(crystals: Sequence[CrystalArrays]) -> list[Relaxed]:
        return [(p.positions[-1], p.cell[-1]) for p in predict(model.to(dtype), list(crystals), dtype=dtype)]

    return run


# --- transformations of a crystal --------------------------------------------------------


def rotated(crystal: CrystalArrays, rotation: np.ndarray) -> CrystalArrays:
    """The crystal turned by the orthogonal matrix ``rotation`` (x -> rotation @ x)."""
    return CrystalArrays(crystal.numbers, crystal.positions @ rotation.T, crystal.cell @ rotation.T, crystal.pbc)


def supercell(crystal: CrystalArrays, transform: np.ndarray) -> tuple[CrystalArrays, np.ndarray]:
    """The supercell ``transform @ cell`` (integer, det > 0) and, per atom of it, the
    (atom of the cell, lattice translation in fractional coordinates) it copies: [m, 4].

    The translations are one representative of each class modulo the superlattice, chosen in
    integers: t with t adj(T) in [0, det T)^3, which is t T^-1 in [0, 1)^3 without rounding.
    The copies are left where the translations put them (not wrapped into the supercell):
    the periodic images are the checks' business, not the construction's.
    """
    transform = np.asarray(transform, dtype=np.int64)
    n_cells = int(round(np.linalg.det(transform)))
    if n_cells < 1:
        raise ValueError("a supercell transform needs a positive determinant")
    adjugate = np.rint(np.linalg.inv(transform) * n_cells).astype(np.int64)  # exact: integer entries
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ transform
    low, high = corners.min(0), corners.max(0)
    grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(low, high)], indexing="ij"), -1).reshape(-1, 3)
    scaled = grid @ adjugate
    translations = grid[np.all((scaled >= 0) & (scaled < n_cells), axis=1)]
    if len(translations) != n_cells:
        raise RuntimeError(f"found {len(translations)} lattice translations for a supercell of {n_cells} cells")
    atoms = np.repeat(np.arange(len(crystal.numbers)), n_cells)
    copies = np.concatenate([atoms[:, None], np.tile(translations, (len(crystal.numbers), 1))], axis=1)
    positions = crystal.positions[copies[:, 0]] + copies[:, 1:].astype(np.float64) @ crystal.cell
    big = CrystalArrays(crystal.numbers[copies[:, 0]], positions, transform.astype(np.float64) @ crystal.cell, crystal.pbc)
    return big, copies


# --- assertions -------------------------------------------------------------------------


def _check(what: str, got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    error = float(np.abs(np.asarray(got) - np.asarray(expected)).max()) if np.size(expected) else 0.0
    if not error <= atol:  # also fails on NaN
        raise AssertionError(f"{what}: off by {error:.3g} Å (tolerance {atol:g})")


def assert_basis_invariant(predictor: Predictor, crystal: CrystalArrays, transforms: Sequence[np.ndarray], atol: float = 1e-8) -> None:
    """Each unimodular change of basis gives the same relaxed crystal, in that basis."""
    positions, cell = predictor([crystal])[0]
    for transform in transforms:
        other = CrystalArrays(crystal.numbers, crystal.positions, np.asarray(transform) @ crystal.cell, crystal.pbc)
        got_positions, got_cell = predictor([other])[0]
        _check(f"not basis invariant (basis {np.asarray(transform).tolist()}), cell", got_cell, np.asarray(transform) @ cell, atol)
        _check(f"not basis invariant (basis {np.asarray(transform).tolist()}), positions", got_positions, positions, atol)


def assert_supercell_invariant(predictor: Predictor, crystal: CrystalArrays, transforms: Sequence[np.ndarray], atol: float = 1e-8) -> None:
    """Each supercell relaxes to the supercell of the relaxed cell: every copy of an atom at
    that atom's prediction plus its lattice translation in the predicted cell."""
    positions, cell = predictor([crystal])[0]
    for transform in transforms:
        big, copies = supercell(crystal, transform)
        got_positions, got_cell = predictor([big])[0]
        name = f"supercell {np.asarray(transform).tolist()}"
        _check(f"not supercell invariant ({name}), cell", got_cell, np.asarray(transform) @ cell, atol)
        expected = positions[copies[:, 0]] + copies[:, 1:].astype(np.float64) @ cell
        _check(f"not supercell invariant ({name}), positions", got_positions, expected, atol)


def assert_translation_invariant(predictor: Predictor, crystal: CrystalArrays, shifts: Sequence[np.ndarray], atol: float = 1e-8) -> None:
    """Shifting the input by t gives the same cell and positions shifted by t cell_in^-1 cell_pred."""
    positions, cell = predictor([crystal])[0]
    carried = np.linalg.solve(crystal.cell, cell)  # cell_in^-1 cell_pred
    for shift in shifts:
        moved = CrystalArrays(crystal.numbers, crystal.positions + shift, crystal.cell, crystal.pbc)
        got_positions, got_cell = predictor([moved])[0]
        _check(f"not translation invariant (shift {np.round(shift, 3).tolist()} Å), cell", got_cell, cell, atol)
        _check(f"not translation invariant (shift {np.round(shift, 3).tolist()} Å), positions", got_positions, positions + shift @ carried, atol)


def assert_image_invariant(predictor: Predictor, crystal: CrystalArrays, rng: np.random.Generator, n_trials: int = 3, atol: float = 1e-8) -> None:
    """Writing atoms in other periodic images moves only them, by the predicted lattice vectors."""
    positions, cell = predictor([crystal])[0]
    for _ in range(n_trials):
        images = rng.integers(-2, 3, size=(len(crystal.numbers), 3)) * np.asarray(crystal.pbc, dtype=np.int64)
        moved = CrystalArrays(crystal.numbers, crystal.positions + images @ crystal.cell, crystal.cell, crystal.pbc)
        got_positions, got_cell = predictor([moved])[0]
        _check("not image invariant, cell", got_cell, cell, atol)
        _check("not image invariant, positions", got_positions, positions + images @ cell, atol)


def face_grazing(crystal: CrystalArrays, atom: int, axis: int, offset: float) -> tuple[CrystalArrays, CrystalArrays]:
    """The crystal translated so that ``atom`` lies ``offset`` (fractional) below the face at 0
    of ``axis``, written once there (-offset) and once as its image just below 1."""
    fractional = np.linalg.solve(crystal.cell.T, crystal.positions.T).T
    fractional[:, axis] -= fractional[atom, axis] + offset
    fractional[atom, axis] = -offset  # exactly, not up to the subtraction's rounding
    above = fractional.copy()
    above[atom, axis] = 1.0 - offset
    return (
        CrystalArrays(crystal.numbers, fractional @ crystal.cell, crystal.cell, crystal.pbc),
        CrystalArrays(crystal.numbers, above @ crystal.cell, crystal.cell, crystal.pbc),
    )


def assert_face_grazing_invariant(
    predictor: Predictor, crystal: CrystalArrays, offsets: Sequence[float] = (1e-15, 1e-12, 1e-9, 1e-6), atol: float = 1e-8
) -> None:
    """An atom within rounding of a cell face relaxes the same, whichever side it is written on."""
    for offset in offsets:
        for axis in range(3):
            below, above = face_grazing(crystal, 0, axis, offset)
            (p_below, c_below), (p_above, c_above) = predictor([below, above])
            _check(f"face-grazing atom (offset {offset:g}, axis {axis}), cell", c_above, c_below, atol)
            expected = p_below.copy()
            expected[0] += c_below[axis]
            _check(f"face-grazing atom (offset {offset:g}, axis {axis}), positions", p_above, expected, atol)


def assert_o3_equivariant(predictor: Predictor, crystal: CrystalArrays, rotations: Sequence[np.ndarray], atol: float = 1e-8) -> None:
    """Rotating or reflecting the input rotates or reflects the prediction."""
    positions, cell = predictor([crystal])[0]
    for rotation in rotations:
        got_positions, got_cell = predictor([rotated(crystal, rotation)])[0]
        kind = "rotation" if np.linalg.det(rotation) > 0 else "reflection"
        _check(f"not {kind} equivariant, cell", got_cell, cell @ rotation.T, atol)
        _check(f"not {kind} equivariant, positions", got_positions, positions @ rotation.T, atol)


def assert_permutation_equivariant(predictor: Predictor, crystal: CrystalArrays, rng: np.random.Generator, atol: float = 1e-8) -> None:
    """Reordering the atoms reorders the prediction and changes nothing else."""
    positions, cell = predictor([crystal])[0]
    order = rng.permutation(len(crystal.numbers))
    got_positions, got_cell = predictor([CrystalArrays(crystal.numbers[order], crystal.positions[order], crystal.cell, crystal.pbc)])[0]
    _check("not permutation equivariant, cell", got_cell, cell, atol)
    _check("not permutation equivariant, positions", got_positions, positions[order], atol)


def assert_one_crystal_one_answer(predictor: Predictor, crystal: CrystalArrays, rng: np.random.Generator, atol: float = 1e-8) -> None:
    """Every check above on one crystal, with random transformations from ``rng``."""
    assert_basis_invariant(predictor, crystal, [random_unimodular(rng) for _ in range(2)], atol)
    assert_supercell_invariant(predictor, crystal, [np.diag([2, 1, 1]), np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]])], atol)
    cell_sum = crystal.cell.sum(0)
    assert_translation_invariant(predictor, crystal, [rng.normal(size=3) * 0.01, rng.normal(size=3) * 3.0, 0.5 * cell_sum], atol)
    assert_image_invariant(predictor, crystal, rng, atol=atol)
    assert_face_grazing_invariant(predictor, crystal, atol=atol)
    assert_o3_equivariant(predictor, crystal, [random_rotation(rng), random_rotation(rng, proper=False)], atol)
    assert_permutation_equivariant(predictor, crystal, rng, atol)


def space_group(numbers, positions, cell, symprec: float = 1e-3) -> str:
    """The international symbol and number spglib finds, e.g. 'Fm-3m (225)'."""
    import spglib

    cell = np.asarray(cell)
    dataset = spglib.get_symmetry_dataset((cell, np.linalg.solve(cell.T, np.asarray(positions).T).T, numbers), symprec=symprec)
    if dataset is None:
        return "none"
    number = dataset.number if hasattr(dataset, "number") else dataset["number"]
    symbol = dataset.international if hasattr(dataset, "international") else dataset["international"]
    return f"{symbol} ({number})"


def assert_space_group_kept(predictor: Predictor, crystals: Sequence[CrystalArrays], names: Sequence[str] | None = None, symprec: float = 1e-3) -> None:
    """Each (symmetric) input comes back with its own space group, checked by spglib.

    Raises:
        AssertionError: listing every crystal whose space group changed.
    """
    names = list(names) if names is not None else [f"crystal {k}" for k in range(len(crystals))]
    changed = []
    for name, crystal, (positions, cell) in zip(names, crystals, predictor(list(crystals))):
        before = space_group(crystal.numbers, crystal.positions, crystal.cell, symprec)
        after = space_group(crystal.numbers, positions, cell, symprec)
        if before != after:
            changed.append(f"{name}: {before} -> {after}")
    if changed:
        raise AssertionError(f"space group not kept (symprec {symprec}): " + "; ".join(changed))


def assert_same_volume_per_atom(predictor: Predictor, primitive: CrystalArrays, conventional: CrystalArrays, rtol: float = 1e-6) -> float:
    """Two cells of one crystal (primitive and conventional, say) relax to the same volume
    per atom; returns the relative change of that volume from the input."""
    (_, cell_p), (_, cell_c) = predictor([primitive, conventional])
    per_atom_p = abs(np.linalg.det(cell_p)) / len(primitive.numbers)
    per_atom_c = abs(np.linalg.det(cell_c)) / len(conventional.numbers)
    if not abs(per_atom_p / per_atom_c - 1) <= rtol:
        raise AssertionError(f"volume per atom {per_atom_p:.9g} Å³ from one cell, {per_atom_c:.9g} Å³ from the other")
    return per_atom_p / (abs(np.linalg.det(primitive.cell)) / len(primitive.numbers)) - 1


def arrays_of(atoms) -> CrystalArrays:
    """An ASE ``Atoms`` as ``CrystalArrays``."""
    return CrystalArrays(atoms.numbers.copy(), atoms.positions.copy(), atoms.cell.array.copy(), np.asarray(atoms.pbc, dtype=bool))


def prototypes() -> dict[str, CrystalArrays]:
    """Ideal symmetric crystals of every crystal system, built by ASE (primitive and
    conventional cells where both exist), named by structure and cell."""
    from ase.build import bulk
    from ase.spacegroup import crystal as from_spacegroup

    built = {
        "Cu fcc primitive": bulk("Cu", "fcc", a=3.61),
        "Cu fcc cubic": bulk("Cu", "fcc", a=3.61, cubic=True),
        "Fe bcc primitive": bulk("Fe", "bcc", a=2.87),
        "Fe bcc cubic": bulk("Fe", "bcc", a=2.87, cubic=True),
        "Ca simple cubic (hypothetical)": bulk("Ca", "sc", a=3.2),
        "Si diamond primitive": bulk("Si", "diamond", a=5.43),
        "Si diamond cubic": bulk("Si", "diamond", a=5.43, cubic=True),
        "GaAs zincblende primitive": bulk("GaAs", "zincblende", a=5.65),
        "NaCl rocksalt primitive": bulk("NaCl", "rocksalt", a=5.64),
        "NaCl rocksalt cubic": bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        "CsCl": bulk("CsCl", "cesiumchloride", a=4.12),
        "CaF2 fluorite primitive": bulk("CaF2", "fluorite", a=5.46),
        "SrTiO3 perovskite": from_spacegroup(
            ["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221, cellpar=[3.9, 3.9, 3.9, 90, 90, 90]
        ),
        "Mg hcp": bulk("Mg", "hcp", a=3.21, c=5.21),
        "ZnO wurtzite": bulk("ZnO", "wurtzite", a=3.25, c=5.21),
        "In body-centred tetragonal": bulk("In", "bct", a=3.25, c=4.95),
        "TiO2 rutile": from_spacegroup(["Ti", "O"], [(0, 0, 0), (0.3, 0.3, 0.0)], spacegroup=136, cellpar=[4.59, 4.59, 2.96, 90, 90, 90]),
        "Ga orthorhombic": from_spacegroup(["Ga"], [(0.0, 0.154, 0.081)], spacegroup=64, cellpar=[4.52, 7.66, 4.53, 90, 90, 90]),
        "Al orthorhombic (ASE)": bulk("Al", "orthorhombic", a=4.0, b=4.6, c=5.1),
        "Sb rhombohedral": from_spacegroup(["Sb"], [(0.0, 0.0, 0.233)], spacegroup=166, cellpar=[4.31, 4.31, 11.27, 90, 90, 120]),
        "Se trigonal": from_spacegroup(["Se"], [(0.217, 0.0, 1.0 / 3.0)], spacegroup=152, cellpar=[4.37, 4.37, 4.95, 90, 90, 120]),
        "monoclinic C2/m": from_spacegroup(["Al", "O"], [(0.09, 0.0, 0.795), (0.16, 0.0, 0.10)], spacegroup=12, cellpar=[11.85, 2.90, 5.62, 90, 103.8, 90]),
        "triclinic P-1": from_spacegroup(["Cu", "S"], [(0.12, 0.27, 0.31), (0.41, 0.13, 0.77)], spacegroup=2, cellpar=[5.1, 5.9, 6.3, 82, 77, 68]),
        "monoclinic P2_1/c": from_spacegroup(["Zr", "O"], [(0.276, 0.04, 0.209), (0.07, 0.33, 0.34)], spacegroup=14, cellpar=[5.15, 5.21, 5.31, 90, 99.2, 90]),
    }
    return {name: arrays_of(atoms) for name, atoms in built.items()}


def assert_rotation_equivariant(model: Network, crystal: CrystalArrays, rotations, atol: float = 1e-9) -> None:
    """Rotating the input rotates every layer's positions and lattice rows (model level).

    Raises:
        AssertionError: naming the largest deviation.
    """
    config = model.config
    with torch.no_grad():
        reference = model(graph_of([crystal], config))
        for rotation in rotations:
            output = model(graph_of([rotated(crystal, rotation)], config))
            rot = torch.as_tensor(rotation, dtype=output.positions.dtype)
            pos_error = (output.positions - reference.positions @ rot.T).abs().max().item()
            cell_error = (output.cell - reference.cell @ rot.T).abs().max().item()
            if pos_error > atol or cell_error > atol:
                raise AssertionError(f"not rotation equivariant: positions off by {pos_error:.3g} Å, cell off by {cell_error:.3g} Å")
