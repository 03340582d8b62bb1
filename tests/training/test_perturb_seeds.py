"""Perturbations (user-like inputs) and seed sources."""

import importlib.util

import numpy as np
import pytest
from ase.build import bulk

from e3relax_ase.training.data.pairs import load_pairs
from e3relax_ase.training.data.perturb import (
    blend_compound_volume,
    element_volume_guess,
    fit_element_volumes,
    make_user_like_inputs,
    rattle,
    rescale_volume,
    strain,
    substitute,
    substitution_candidates,
)
from e3relax_ase.training.data.seeds import aflow_prototypes_path, load_seed_structures
from tests.paths import TEST_DATA

DATA = TEST_DATA


@pytest.fixture
def zintl():
    """A real DFT-relaxed Zintl crystal (K Sn Bi, 9 atoms) from the NREL sample."""
    return load_pairs(DATA / "nrel_sample_pairs.npz").to_atoms_pairs()[9][1]


def _snapshot(atoms):
    return atoms.positions.copy(), atoms.cell.array.copy(), atoms.numbers.copy(), dict(atoms.info)


def _unchanged(atoms, snap):
    pos, cell, numbers, info = snap
    return np.array_equal(atoms.positions, pos) and np.array_equal(atoms.cell.array, cell) and np.array_equal(atoms.numbers, numbers) and atoms.info == info


def test_strain_is_symmetric_bounded_and_keeps_fractions(zintl):
    snap = _snapshot(zintl)
    out, eps = strain(zintl, 0.05, np.random.default_rng(1))
    assert _unchanged(zintl, snap)
    np.testing.assert_allclose(eps, eps.T)
    assert np.abs(eps).max() <= 0.05 and np.abs(eps).max() > 0.005
    np.testing.assert_allclose(out.cell.array, zintl.cell.array @ (np.eye(3) + eps))
    np.testing.assert_allclose(out.get_scaled_positions(wrap=False), zintl.get_scaled_positions(wrap=False), atol=1e-12)
    again, eps2 = strain(zintl, 0.05, np.random.default_rng(1))
    np.testing.assert_array_equal(eps, eps2)
    with pytest.raises(ValueError):
        strain(zintl, -0.1, np.random.default_rng(0))


def test_rattle_moves_atoms_by_the_requested_amount():
    atoms = bulk("Cu", "fcc", a=3.6) * (4, 4, 4)
    snap = _snapshot(atoms)
    out = rattle(atoms, 0.1, np.random.default_rng(0))
    assert _unchanged(atoms, snap)
    d = out.positions - atoms.positions
    assert d.std() == pytest.approx(0.1, rel=0.15)
    np.testing.assert_array_equal(out.cell.array, atoms.cell.array)


def test_rescale_volume_within_range(zintl):
    for seed in range(5):
        out, factor = rescale_volume(zintl, (0.8, 1.3), np.random.default_rng(seed))
        assert 0.8 <= factor <= 1.3
        assert out.get_volume() / zintl.get_volume() == pytest.approx(factor)
    with pytest.raises(ValueError):
        rescale_volume(zintl, (1.2, 1.0), np.random.default_rng(0))


def test_substitution_rule():
    from ase.data import atomic_numbers as Z

    assert {Z["Sr"], Z["Ca"]} <= set(substitution_candidates(Z["Ba"]))
    assert Z["P"] in substitution_candidates(Z["As"])
    assert Z["Si"] not in substitution_candidates(Z["C"])  # radii differ by far more than 25 %
    assert substitution_candidates(Z["Ar"]) == []
    assert set(substitution_candidates(Z["Cu"], allowed=[Z["Ag"], Z["Au"], Z["Ni"]])) == {Z["Ag"], Z["Au"]}
    for z in range(1, 84):
        for c in substitution_candidates(z):
            assert c not in (43, 61) and c <= 83


def test_substitute_replaces_one_whole_species(zintl):
    snap = _snapshot(zintl)
    out, mapping = substitute(zintl, np.random.default_rng(3))
    assert _unchanged(zintl, snap)
    assert len(mapping) == 1
    ((old, new),) = mapping.items()
    symbols_in, symbols_out = zintl.get_chemical_symbols(), out.get_chemical_symbols()
    assert new not in symbols_in and old not in symbols_out
    assert [new if s == old else s for s in symbols_in] == symbols_out
    np.testing.assert_array_equal(out.positions, zintl.positions)


def test_substitute_without_candidates_returns_copy():
    carbon = bulk("C", "diamond", a=3.57)
    out, mapping = substitute(carbon, np.random.default_rng(0))
    assert mapping == {} and out is not carbon and np.array_equal(out.numbers, carbon.numbers)


def test_make_user_like_inputs_records_and_reproduces(zintl):
    seeds = [zintl, bulk("Cu", "fcc", a=3.6, cubic=True)]
    seeds[0].info["seed_id"] = "nrel:KSnBi"
    snaps = [_snapshot(s) for s in seeds]
    kwargs = dict(strain_magnitude=0.03, rattle_stdev=0.05, volume_range=(0.9, 1.1), substitute_probability=1.0)
    a = make_user_like_inputs(seeds, 3, np.random.default_rng(7), **kwargs)
    b = make_user_like_inputs(seeds, 3, np.random.default_rng(7), **kwargs)
    c = make_user_like_inputs(seeds, 3, np.random.default_rng(8), **kwargs)
    assert all(_unchanged(s, snap) for s, snap in zip(seeds, snaps, strict=True))
    assert len(a) == 6 and [x.info["seed_id"] for x in a] == ["nrel:KSnBi"] * 3 + ["seed1"] * 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.info == y.info
    assert not np.allclose(a[0].positions, c[0].positions)
    p = a[0].info["perturbation"]
    assert set(p) == {"substitution", "volume_factor", "strain", "rattle_stdev"}
    assert len(p["substitution"]) == 1 and 0.9 <= p["volume_factor"] <= 1.1
    assert np.asarray(p["strain"]).shape == (3, 3)
    # Volume follows the recorded factor and strain: V = V0 * f * det(I + eps).
    v = zintl.get_volume() * p["volume_factor"] * np.linalg.det(np.eye(3) + np.asarray(p["strain"]))
    assert a[0].get_volume() == pytest.approx(v, rel=1e-5)


# --- seeds --------------------------------------------------------------------------------
def test_fit_element_volumes_recovers_additive_volumes():
    """Relaxed volumes made from known per-element volumes are fitted back exactly."""
    from e3relax_ase.training.data.pairs import PairSet

    truth = {11: 23.0, 17: 18.0, 29: 11.5}  # Na, Cl, Cu
    compositions = [[29], [11, 11], [11, 17], [29, 17, 17], [11, 11, 29], [17, 29, 29, 29]]
    n = np.array([len(c) for c in compositions])
    cells = np.stack([np.eye(3) * sum(truth[z] for z in c) ** (1 / 3) for c in compositions])
    positions = np.random.default_rng(0).uniform(0, 1, (n.sum(), 3))
    pairs = PairSet(
        ids=[f"p{k}" for k in range(len(n))],
        n_atoms=n,
        offsets=np.concatenate([[0], np.cumsum(n)]),
        numbers=np.concatenate(compositions),
        pos_unrelaxed=positions,
        pos_relaxed=positions,
        cell_unrelaxed=cells,
        cell_relaxed=cells,
    )
    fitted = fit_element_volumes(pairs)
    assert fitted.keys() == truth.keys()
    for z, v in truth.items():
        assert fitted[z] == pytest.approx(v, rel=1e-9)


def test_blend_compound_volume_is_the_geometric_mean_and_leaves_elements_alone(zintl):
    volumes = {int(z): 20.0 for z in set(zintl.numbers)}
    snap = _snapshot(zintl)
    blended, record = blend_compound_volume(zintl, volumes)
    assert _unchanged(zintl, snap)  # the input is not modified
    v_old = zintl.get_volume()
    guess = 20.0 * len(zintl)
    assert element_volume_guess(zintl.numbers, volumes) == pytest.approx(guess)
    assert blended.get_volume() == pytest.approx(np.sqrt(v_old * guess), rel=1e-12)
    assert record["volume_scale"] == pytest.approx(np.sqrt(guess / v_old), rel=1e-5)
    np.testing.assert_allclose(blended.get_scaled_positions(), zintl.get_scaled_positions(), atol=1e-12)
    # Elemental cells and compounds with an element of unknown volume keep their volume.
    copper = bulk("Cu", "fcc", a=3.6)
    same, none = blend_compound_volume(copper, {29: 100.0})
    assert none is None and same.get_volume() == pytest.approx(copper.get_volume())
    missing = dict(volumes)
    missing.pop(int(zintl.numbers[0]))
    same, none = blend_compound_volume(zintl, missing)
    assert none is None and same.get_volume() == pytest.approx(v_old)


def test_csv_seeds_named_and_by_path():
    perov = load_seed_structures("perov_5", data_dir=DATA / "seeds")
    assert [a.info["seed_id"] for a in perov] == ["perov_5:18517", "perov_5:15400", "perov_5:3409"]
    assert perov[0].get_chemical_formula() == "CdCuN3" and len(perov[0]) == 5
    carbon = load_seed_structures(DATA / "seeds" / "carbon_24" / "val.csv.gz", limit=2)
    assert len(carbon) == 2 and set(carbon[0].get_chemical_symbols()) == {"C"}
    assert carbon[0].info["seed_id"] == "carbon_24/val:C-148264-7891-51"
    picked = load_seed_structures(DATA / "seeds" / "carbon_24", limit=2, rng=np.random.default_rng(0))
    again = load_seed_structures(DATA / "seeds" / "carbon_24", limit=2, rng=np.random.default_rng(0))
    assert [a.info["seed_id"] for a in picked] == [a.info["seed_id"] for a in again]


def test_aflow_prototypes_from_pymatgen():
    assert aflow_prototypes_path().is_file()
    seeds = load_seed_structures("aflow", limit=3, rng=np.random.default_rng(0))
    assert len(seeds) == 3 and all(s.info["seed_id"].startswith("aflow:") for s in seeds)
    assert all(s.get_volume() > 1 for s in seeds)


def test_dcdft_collection():
    seeds = load_seed_structures("dcdft")
    assert len(seeds) == 71 and seeds[0].info["seed_id"] == "dcdft:H"
    assert len(load_seed_structures("dcdft", limit=4, rng=np.random.default_rng(1))) == 4


def test_structure_file_seeds(tmp_path):
    from ase.io import write

    write(tmp_path / "s.extxyz", [bulk("Al", "fcc", a=4.05), bulk("Ni", "fcc", a=3.52)])
    seeds = load_seed_structures(tmp_path / "s.extxyz")
    assert [s.info["seed_id"] for s in seeds] == ["s:0", "s:1"]


@pytest.mark.skipif(importlib.util.find_spec("pyxtal") is not None, reason="pyxtal installed: error path not reachable")
def test_pyxtal_missing_gives_clear_error():
    with pytest.raises(ImportError, match="optional package pyxtal"):
        load_seed_structures("pyxtal", limit=1)


@pytest.mark.skipif(importlib.util.find_spec("pyxtal") is None, reason="pyxtal is optional and not installed")
def test_pyxtal_random_crystals():
    seeds = load_seed_structures("pyxtal", limit=2, rng=np.random.default_rng(0))
    assert len(seeds) == 2 and all(s.info["seed_id"].startswith("pyxtal:") for s in seeds)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown seed source 'nonsense'"):
        load_seed_structures("nonsense")
