"""Input validation: one test per row of docs/reliability.md (Python API rows)."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111

from e3relax_ase.geometry.validation import (
    MAX_PAIRS_SEARCHED,
    InvalidStructureError,
    validate_arrays,
    validate_atoms,
)
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import tiny_model


@pytest.fixture(scope="module")
def relaxer():
    return OneShotRelaxer(tiny_model(), device="cpu")


def refused(atoms, match, **kwargs):
    """Validation refuses ``atoms`` with a one-line message naming it and matching ``match``."""
    with pytest.raises(InvalidStructureError, match=match) as info:
        validate_atoms(atoms, name="my-crystal", **kwargs)
    message = str(info.value)
    assert message.startswith("my-crystal: ")
    assert "\n" not in message
    return message


def nacl():
    return bulk("NaCl", "rocksalt", a=5.64, cubic=True)


def test_valid_crystal_reports_edges():
    report = validate_atoms(nacl(), max_neighbors=50)
    assert report.n_atoms == 8
    assert report.n_edges == 8 * 32  # shells of 6 + 12 + 8 + 6 neighbours within 6 Å
    assert report.min_distance == pytest.approx(2.82, abs=1e-6)
    assert validate_atoms(nacl(), max_neighbors=20).n_edges == 8 * 20  # the K cap


def test_no_atoms():
    refused(Atoms(cell=np.eye(3) * 4, pbc=True), "has no atoms")


def test_mismatched_array_lengths():
    atoms = nacl()
    atoms.arrays["initial_magmoms"] = np.zeros(5)  # bypasses ASE's own length check
    refused(atoms, "per-atom array 'initial_magmoms' has 5 entries for 8 atoms")
    with pytest.raises(InvalidStructureError, match="positions of shape"):
        validate_arrays([11, 17], np.zeros((3, 3)), np.eye(3) * 5, [True] * 3)


def test_nan_positions():
    atoms = nacl()
    atoms.positions[3, 1] = np.nan
    refused(atoms, r"NaN or infinite positions \(atoms \[3\]\)")


def test_infinite_cell():
    atoms = nacl()
    atoms.cell[0, 0] = np.inf
    refused(atoms, "NaN or infinite cell")


def test_atom_far_beyond_the_cell_is_refused_not_rounded():
    atoms = nacl()
    atoms.positions[2] += 1e15 * atoms.cell[0] / np.linalg.norm(atoms.cell[0])  # 1e15 Å out along a periodic axis
    refused(atoms, r"has an atom 1e\+15 Å from the origin, where float64 keeps positions only to 0\.12 Å; wrap")
    atoms.wrap()
    validate_atoms(atoms, "wrapped")  # the same crystal, wrapped back, passes


def test_molecule_refused():
    refused(Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=np.eye(3) * 10, pbc=False), "not periodic")


def test_no_cell():
    refused(Atoms("Cu", positions=[[0, 0, 0]], pbc=True), "has no cell")


def test_zero_periodic_vector():
    atoms = nacl()
    atoms.cell[1] = 0.0
    refused(atoms, "zero lattice vector along periodic axis 1")


def test_vacuum_axis_without_vector():
    slab = fcc111("Cu", (2, 2, 3))  # no vacuum: cell[2] is zero
    slab.cell[2] = 0.0
    refused(slab, r"no lattice vector along vacuum axis 2; add vacuum")


def test_degenerate_cell():
    atoms = nacl()
    atoms.cell[2] = atoms.cell[0] + atoms.cell[1]  # coplanar: det = 0
    refused(atoms, r"degenerate cell .*det\(cell\) ~ 0")


def test_left_handed_cell_accepted(relaxer):
    atoms = nacl()
    atoms.set_cell(atoms.cell.array[[1, 0, 2]], scale_atoms=False)
    assert np.linalg.det(atoms.cell.array) < 0
    validate_atoms(atoms)
    relaxed = relaxer.relax(atoms)
    assert np.linalg.det(relaxed.cell.array) < 0
    assert relaxed.info["e3relax_sane"]


def test_unknown_element():
    refused(nacl(), r"not trained on \(atomic numbers \[17\]\)", elements=[11, 8])
    atoms = nacl()
    atoms.numbers[0] = 119
    refused(atoms, r"atomic numbers \[119\]")


def test_checkpoint_elements_used_by_relaxer():
    model = tiny_model()
    relaxer = OneShotRelaxer(model, device="cpu")
    relaxer.info.metadata["elements"] = [11]
    with pytest.raises(InvalidStructureError, match=r"\[17\]"):
        relaxer.relax(nacl())


def test_skewed_cell_refused():
    slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    # 2D cells are not reduced: a 3 degree angle between the in-plane vectors is refused.
    a = slab.cell[0]
    slab.set_cell([a, a * 1.0 + np.array([0, 0.15, 0]), slab.cell[2]], scale_atoms=False)
    refused(slab, "extremely skewed cell")


def test_skewed_but_reducible_3d_cell_accepted():
    atoms = nacl()
    cell = atoms.cell.array.copy()
    skewed = np.array([cell[0], cell[1] + 7 * cell[0], cell[2] + 5 * cell[1]])  # same lattice
    atoms.set_cell(skewed, scale_atoms=False)
    angles = atoms.cell.angles()
    assert min(angles) < 10.0
    validate_atoms(atoms)


def test_atoms_too_close():
    atoms = nacl()
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    refused(atoms, r"atoms 0 and 1 are 0.300 Å apart \(< 0.5 Å\)")


def test_atom_too_close_to_its_image():
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[0.4, 5, 5], pbc=True)
    refused(atoms, "atom 0 is 0.400 Å from its own periodic image")


def test_min_distance_threshold_configurable():
    atoms = nacl()
    atoms.positions[1] = atoms.positions[0] + [1.0, 0, 0]
    validate_atoms(atoms)
    refused(atoms, "1.000 Å apart", min_distance=1.2)


def test_isolated_atom():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [10, 10, 10]], cell=[20, 20, 20], pbc=True)
    refused(atoms, "atom 0 has no neighbour within the 6.0 Å cutoff")


def test_single_atom_periodic_allowed(relaxer):
    atoms = bulk("Cu")  # one atom; its own images are its neighbours
    assert len(atoms) == 1
    report = validate_atoms(atoms)
    assert report.n_edges > 0
    assert len(relaxer.relax(atoms)) == 1


def test_too_large_for_memory_budget():
    atoms = nacl() * (2, 2, 2)
    refused(atoms, r"too large for the memory budget: 2048 graph edges for 64 atoms, budget 1500", max_edges=1500)
    # Far over the budget: refused from the density estimate before any neighbour search.
    big = nacl() * (6, 6, 6)
    refused(big, "too large for the memory budget: about", max_edges=1000)


def test_huge_cell_refused_before_searching():
    dense = Atoms("H", positions=[[0, 0, 0]], cell=np.eye(3) * 0.6, pbc=True) * (40, 40, 40)
    expected = 64_000 * 64_000 / dense.get_volume() * 4 / 3 * np.pi * 6.0**3
    assert expected > MAX_PAIRS_SEARCHED
    refused(dense, "too large or too dense to search")


def test_relaxer_validates_before_the_network(relaxer, monkeypatch):
    import e3relax_ase.relax.runner as module  # where relax_many calls the network

    def fail(*args, **kwargs):
        raise AssertionError("the network ran on an invalid input")

    monkeypatch.setattr(module, "predict", fail)
    atoms = nacl()
    atoms.positions[1] = atoms.positions[0]
    with pytest.raises(InvalidStructureError, match="Cl4Na4: atoms 0 and 1"):
        relaxer.relax(atoms)


def test_relaxer_edge_budget_refuses_structure():
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", max_edges=100)
    with pytest.raises(InvalidStructureError, match="memory budget"):
        relaxer.relax(nacl())


@pytest.mark.parametrize("edge", [6.0, 6.0 - 1e-12, 6.0 + 1e-12, 5.995])
def test_an_atom_whose_neighbours_sit_at_the_cutoff_is_refused_however_written(edge):
    """Issue 15 item 2: an atom whose only neighbours are its images at the cutoff was refused
    or accepted by rounding once rotated; within keys.ISOLATION_MARGIN of the cutoff it is
    refused in every orientation and basis."""
    from e3relax_ase.geometry.validation import prepare_arrays
    from e3relax_ase.testing import random_rotation, random_unimodular

    rng = np.random.default_rng(7)
    for _ in range(25):
        rotation = random_rotation(rng)
        basis = random_unimodular(rng)
        cell = basis @ (np.eye(3) * edge) @ rotation.T
        with pytest.raises(InvalidStructureError, match="no neighbour within"):
            prepare_arrays([29], rng.uniform(-3, 3, size=(1, 3)), cell, np.ones(3, dtype=bool))


def test_an_atom_whose_neighbours_are_felt_is_accepted_however_written():
    from e3relax_ase.geometry.validation import prepare_arrays
    from e3relax_ase.testing import random_rotation, random_unimodular

    rng = np.random.default_rng(8)
    for _ in range(25):
        cell = random_unimodular(rng) @ (np.eye(3) * 5.98) @ random_rotation(rng).T
        prepare_arrays([29], rng.uniform(-3, 3, size=(1, 3)), cell, np.ones(3, dtype=bool))
