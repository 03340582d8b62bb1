"""Importers on real data: NREL DFT pairs and SevenNet-0 demo pairs written into each layout."""

import shutil

import numpy as np
import pytest
from ase.io import read, write

from e3relax_ase.training.data.importers import (
    detect_format,
    import_ase_db,
    import_authors_layout,
    import_extxyz,
    import_pairs,
    import_traj,
    import_vasp,
)
from e3relax_ase.training.data.pairs import load_pairs
from tests.paths import TEST_DATA

DATA = TEST_DATA
SAMPLE = DATA / "nrel_sample_pairs.npz"
DEMO = DATA / "sevennet0_demo_sample.extxyz"


@pytest.fixture(scope="module")
def sample():
    return load_pairs(SAMPLE)


def assert_pair_equal(pairset, k, reference, r, atol=1e-6):
    """Pair k of ``pairset`` equals pair r of ``reference`` (Cartesian, same orientation)."""
    a, b = pairset.pair(k), reference.pair(r)
    np.testing.assert_array_equal(a.numbers, b.numbers)
    for name in ("pos_unrelaxed", "pos_relaxed", "cell_unrelaxed", "cell_relaxed"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, rtol=0, err_msg=name)


def assert_pair_equal_up_to_orientation(pairset, k, reference, r, atol=1e-5):
    """CIF keeps cell parameters and fractional coordinates (mod 1), not the cell's orientation."""
    from ase.geometry import cell_to_cellpar

    a, b = pairset.pair(k), reference.pair(r)
    np.testing.assert_array_equal(a.numbers, b.numbers)
    for which in ("unrelaxed", "relaxed"):
        ca, cb = getattr(a, f"cell_{which}"), getattr(b, f"cell_{which}")
        np.testing.assert_allclose(cell_to_cellpar(ca), cell_to_cellpar(cb), atol=atol)
        fa = np.linalg.solve(ca.T, getattr(a, f"pos_{which}").T).T
        fb = np.linalg.solve(cb.T, getattr(b, f"pos_{which}").T).T
        d = (fa - fb + 0.5) % 1.0 - 0.5
        assert np.abs(d).max() < atol


# --- extxyz -------------------------------------------------------------------------------
def test_extxyz_with_roles_reads_the_real_demo_file():
    pairs = import_extxyz(DEMO)
    frames = read(DEMO, index=":")
    assert list(pairs.ids) == ["w0_0", "w0_1", "w0_2", "w0_3"]
    for k in range(4):
        np.testing.assert_array_equal(pairs.pair(k).pos_unrelaxed, frames[2 * k].positions)
        np.testing.assert_array_equal(pairs.pair(k).cell_relaxed, frames[2 * k + 1].cell.array)
        assert pairs.info[k]["teacher"] == "SevenNet-0" and pairs.info[k]["converged"] is True
        e = frames[2 * k + 1].get_potential_energy() / len(frames[2 * k + 1])
        assert pairs.energy_per_atom_relaxed[k] == pytest.approx(e)


def test_extxyz_roles_in_any_order(tmp_path):
    frames = read(DEMO, index=":")
    shuffled = [frames[3], frames[0], frames[1], frames[2]]  # w0_1 relaxed first
    write(tmp_path / "s.extxyz", shuffled)
    pairs = import_extxyz(tmp_path / "s.extxyz")
    assert list(pairs.ids) == ["w0_1", "w0_0"]
    np.testing.assert_allclose(pairs.pair(0).pos_relaxed, frames[3].positions, atol=1e-7)


def test_extxyz_alternating_frames_without_roles(tmp_path, sample):
    frames = []
    for unrelaxed, relaxed in sample.to_atoms_pairs():
        unrelaxed.info, relaxed.info = {}, {}
        frames += [unrelaxed, relaxed]
    write(tmp_path / "alt.extxyz", frames)
    pairs = import_pairs(tmp_path / "alt.extxyz")
    assert list(pairs.ids) == [f"alt_{k}" for k in range(len(sample))]
    for k in range(len(sample)):
        assert_pair_equal(pairs, k, sample, k)
    write(tmp_path / "odd.extxyz", frames[:-1])
    with pytest.raises(ValueError, match="31 frames cannot alternate"):
        import_extxyz(tmp_path / "odd.extxyz")


def test_extxyz_refuses_mismatch_naming_the_pair(tmp_path):
    frames = read(DEMO, index=":")
    frames[3].numbers = frames[3].numbers[::-1]  # relaxed frame of w0_1 in reverse order
    write(tmp_path / "bad.extxyz", frames)
    with pytest.raises(ValueError, match="pair 'w0_1'.*order differ"):
        import_extxyz(tmp_path / "bad.extxyz")
    write(tmp_path / "lonely.extxyz", frames[:3])
    with pytest.raises(ValueError, match="pair 'w0_1' has no relaxed frame"):
        import_extxyz(tmp_path / "lonely.extxyz")


# --- authors' CIF layout ------------------------------------------------------------------
def _write_cif_layout(root, sample, indices, style="U"):
    cif_dir = root / "CIF"
    cif_dir.mkdir(parents=True)
    suffix = {"U": ("_U", "_R"), "long": ("_unrelaxed", "_relaxed")}[style]
    for k in indices:
        unrelaxed, relaxed = sample.to_atoms_pairs()[k]
        write(cif_dir / f"{sample.ids[k]}{suffix[0]}.cif", unrelaxed, format="cif")
        write(cif_dir / f"{sample.ids[k]}{suffix[1]}.cif", relaxed, format="cif")


def test_authors_layout_with_split_csvs(tmp_path, sample):
    _write_cif_layout(tmp_path, sample, range(8))
    ids = list(sample.ids)
    (tmp_path / "train.csv").write_text("material_id,formation_energy\n" + "".join(f"{i},0.0\n" for i in ids[:5]))
    (tmp_path / "val.csv").write_text("".join(f"{i}\n" for i in ids[5:7]))  # no header
    (tmp_path / "test.csv").write_text("x,id\n" + f"7,{ids[7]}\n")
    splits = import_authors_layout(tmp_path)
    assert {k: list(v.ids) for k, v in splits.items()} == {"train": ids[:5], "val": ids[5:7], "test": ids[7:8]}
    for name, offset in (("train", 0), ("val", 5), ("test", 7)):
        for k in range(len(splits[name])):
            assert_pair_equal_up_to_orientation(splits[name], k, sample, offset + k)
            assert splits[name].info[k]["split"] == name
    joined = import_pairs(tmp_path)
    assert list(joined.ids) == ids[:8]


def test_authors_layout_long_names_without_csvs(tmp_path, sample):
    _write_cif_layout(tmp_path, sample, [9, 2], style="long")
    splits = import_authors_layout(tmp_path)
    assert list(splits) == ["all"] and sorted(splits["all"].ids) == sorted([sample.ids[9], sample.ids[2]])
    assert detect_format(tmp_path) == "authors"


def test_authors_layout_refuses_mismatch_and_missing(tmp_path, sample):
    _write_cif_layout(tmp_path, sample, [6])
    pair_id = sample.ids[6]
    relaxed = read(tmp_path / "CIF" / f"{pair_id}_R.cif")
    write(tmp_path / "CIF" / f"{pair_id}_R.cif", relaxed[:-1], format="cif")
    with pytest.raises(ValueError, match=f"pair '{pair_id}': unrelaxed has 9 atoms but relaxed has 8"):
        import_authors_layout(tmp_path)
    (tmp_path / "train.csv").write_text(f"id\n{pair_id}\nnot_there\n")
    write(tmp_path / "CIF" / f"{pair_id}_R.cif", relaxed, format="cif")
    with pytest.raises(ValueError, match="'not_there': listed in train.csv but has no CIF files"):
        import_authors_layout(tmp_path)


# --- VASP ---------------------------------------------------------------------------------
def _vasp_runs(root, sample):
    """Three real relaxations in three VASP layouts; returns their sample indices."""
    run = root / "run_a_vasprun"
    run.mkdir(parents=True)
    shutil.copy(DATA / "vasprun.xml", run / "vasprun.xml")  # NREL pair 0
    unrelaxed, relaxed = sample.to_atoms_pairs()[6]
    (root / "run_b_xdatcar").mkdir()
    write(root / "run_b_xdatcar" / "XDATCAR", [unrelaxed, relaxed], format="vasp-xdatcar")
    unrelaxed, relaxed = sample.to_atoms_pairs()[15]
    (root / "run_c_poscar").mkdir()
    write(root / "run_c_poscar" / "POSCAR", unrelaxed, format="vasp")
    write(root / "run_c_poscar" / "CONTCAR", relaxed, format="vasp")
    return [0, 6, 15]


def test_vasp_directories(tmp_path, sample):
    indices = _vasp_runs(tmp_path, sample)
    pairs = import_vasp(tmp_path)
    assert list(pairs.ids) == ["run_a_vasprun", "run_b_xdatcar", "run_c_poscar"]
    for k, r in enumerate(indices):
        assert_pair_equal(pairs, k, sample, r)
    # vasprun.xml carries the real DFT energy of the relaxed structure.
    assert pairs.energy_per_atom_relaxed[0] == pytest.approx(sample.energy_per_atom_relaxed[0], abs=1e-7)
    assert np.isnan(pairs.energy_per_atom_relaxed[2])
    single = import_pairs(tmp_path / "run_b_xdatcar")
    assert list(single.ids) == ["run_b_xdatcar"]
    assert detect_format(tmp_path) == "vasp"


def test_vasprun_file_directly(sample):
    pairs = import_pairs(DATA / "vasprun.xml")
    assert_pair_equal(pairs, 0, sample, 0)


def test_vasp_refuses_mismatch_naming_the_run(tmp_path, sample):
    unrelaxed, relaxed = sample.to_atoms_pairs()[9]  # K Sn Bi
    run = tmp_path / "bad_run"
    run.mkdir()
    write(run / "POSCAR", unrelaxed, format="vasp")
    relaxed.numbers = np.where(relaxed.numbers == 50, 32, relaxed.numbers)  # Sn -> Ge
    write(run / "CONTCAR", relaxed, format="vasp")
    with pytest.raises(ValueError, match="pair 'bad_run'.*species differ"):
        import_vasp(run)


# --- ASE trajectories and databases -------------------------------------------------------
def test_traj_first_and_last_frame(tmp_path, sample):
    unrelaxed, relaxed = sample.to_atoms_pairs()[4]
    middle = unrelaxed.copy()
    middle.positions += 0.3
    write(tmp_path / "relax_4.traj", [unrelaxed, middle, relaxed])
    pairs = import_pairs(tmp_path / "relax_4.traj")
    assert list(pairs.ids) == ["relax_4"]
    assert_pair_equal(pairs, 0, sample, 4)
    write(tmp_path / "single.traj", [unrelaxed])
    with pytest.raises(ValueError, match="'single': trajectory has 1 frame"):
        import_traj(tmp_path / "single.traj")


def test_ase_db_with_roles_and_alternating(tmp_path, sample):
    from ase.db import connect

    atoms_pairs = sample.to_atoms_pairs()
    with connect(tmp_path / "roles.db") as db:
        for k in (3, 11):  # relaxed rows first: grouping must go by pair_id and role
            unrelaxed, relaxed = atoms_pairs[k]
            db.write(relaxed, pair_id=str(sample.ids[k]), role="relaxed", teacher="VASP")
            db.write(unrelaxed, pair_id=str(sample.ids[k]), role="unrelaxed")
    pairs = import_pairs(tmp_path / "roles.db")
    assert list(pairs.ids) == [sample.ids[3], sample.ids[11]]
    for k, r in enumerate((3, 11)):
        assert_pair_equal(pairs, k, sample, r)
        assert pairs.energy_per_atom_relaxed[k] == pytest.approx(sample.energy_per_atom_relaxed[r])
        assert pairs.info[k] == {"teacher": "VASP"}
    with connect(tmp_path / "alt.db") as db:
        for unrelaxed, relaxed in atoms_pairs[:3]:
            db.write(unrelaxed)
            db.write(relaxed)
    alt = import_ase_db(tmp_path / "alt.db")
    assert list(alt.ids) == ["alt_0", "alt_1", "alt_2"]
    assert_pair_equal(alt, 2, sample, 2)


# --- dispatcher ---------------------------------------------------------------------------
def test_dispatcher_formats_and_errors(tmp_path, sample):
    assert len(import_pairs(SAMPLE)) == len(sample)
    assert len(import_pairs(DEMO, format="extxyz")) == 4
    with pytest.raises(FileNotFoundError):
        import_pairs(tmp_path / "nope.extxyz")
    with pytest.raises(ValueError, match="unknown pair format"):
        import_pairs(DEMO, format="cif")
    (tmp_path / "pairs.dat").write_text("1\n")
    with pytest.raises(ValueError, match="cannot tell the pair format"):
        import_pairs(tmp_path / "pairs.dat")
