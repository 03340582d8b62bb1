"""The pair format and PairSet, on real DFT pairs (tests/data/nrel_sample_pairs.npz)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from e3relax_ase.training.data.pairs import (
    PairSet,
    load_pairs,
    save_pairs,
    save_pairs_extxyz,
)
from tests.paths import TEST_DATA

DATA = TEST_DATA
SAMPLE = DATA / "nrel_sample_pairs.npz"
DEMO = DATA / "sevennet0_demo_sample.extxyz"
ARRAYS = ("n_atoms", "offsets", "numbers", "pos_unrelaxed", "pos_relaxed", "cell_unrelaxed", "cell_relaxed", "pbc")


@pytest.fixture
def sample():
    return load_pairs(SAMPLE)


def assert_same(a: PairSet, b: PairSet, atol=0.0):
    assert list(a.ids) == list(b.ids)
    for name in ARRAYS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, rtol=0, err_msg=name)
    np.testing.assert_allclose(a.energy_per_atom_relaxed, b.energy_per_atom_relaxed, atol=1e-9, equal_nan=True)
    assert a.info == b.info


def test_sample_has_the_documented_arrays_and_dtypes():
    with np.load(SAMPLE, allow_pickle=False) as data:
        n = len(data["ids"])
        assert data["ids"].dtype.kind == "U"
        assert data["n_atoms"].dtype == np.int64 and data["n_atoms"].shape == (n,)
        assert data["offsets"].shape == (n + 1,) and data["offsets"].dtype == np.int64
        n_total = int(data["offsets"][-1])
        assert data["numbers"].shape == (n_total,) and data["numbers"].dtype == np.int64
        assert data["pos_unrelaxed"].shape == (n_total, 3) and data["pos_relaxed"].dtype == np.float64
        assert data["cell_relaxed"].shape == (n, 3, 3)
        assert data["pbc"].shape == (n, 3) and data["pbc"].dtype == bool
        assert str(data["format"]) == "e3relax-pairs" and int(data["format_version"]) == 1
        assert "Pandey" in json.loads(str(data["metadata"]))["citation"]


def test_nrel_layout_without_optional_arrays_loads(tmp_path, sample):
    # The shared NREL file has only the required arrays + energies; that layout must load as is.
    path = tmp_path / "nrel_like.npz"
    np.savez_compressed(
        path,
        ids=sample.ids,
        n_atoms=sample.n_atoms,
        offsets=sample.offsets,
        numbers=sample.numbers,
        pos_unrelaxed=sample.pos_unrelaxed,
        pos_relaxed=sample.pos_relaxed,
        cell_unrelaxed=sample.cell_unrelaxed,
        cell_relaxed=sample.cell_relaxed,
        energy_per_atom_relaxed=sample.energy_per_atom_relaxed,
    )
    loaded = load_pairs(path)
    assert loaded.pbc.all() and loaded.metadata == {} and loaded.info == [{}] * len(sample)
    sample.info = [{}] * len(sample)
    assert_same(loaded, sample)


def test_loading_needs_only_numpy():
    code = (
        "import sys; from e3relax_ase.training.data.pairs import load_pairs; "
        f"p = load_pairs({str(SAMPLE)!r}); "
        "heavy = [m for m in ('ase', 'pymatgen', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy; print(len(p))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "16"


def test_npz_round_trip_keeps_everything(tmp_path, sample):
    sample.info[3] = {"seed_id": "x", "perturbation": {"strain": [[0.01, 0, 0], [0, 0, 0], [0, 0, 0]]}, "steps": 7}
    sample.energy_per_atom_relaxed[1] = np.nan
    path = save_pairs(tmp_path / "out.npz", sample)
    loaded = load_pairs(path)
    assert_same(loaded, sample)
    assert loaded.metadata == sample.metadata
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_pair_and_subset(sample):
    sub = sample.subset([5, 0, 12])
    assert len(sub) == 3 and list(sub.ids) == [sample.ids[5], sample.ids[0], sample.ids[12]]
    for j, k in enumerate([5, 0, 12]):
        a, b = sub.pair(j), sample.pair(k)
        assert a.id == b.id
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.pos_relaxed, b.pos_relaxed)
        np.testing.assert_array_equal(a.cell_unrelaxed, b.cell_unrelaxed)
        assert a.energy_per_atom_relaxed == b.energy_per_atom_relaxed
    mask = np.zeros(len(sample), bool)
    mask[[2, 7]] = True
    assert list(sample.subset(mask).ids) == [sample.ids[2], sample.ids[7]]
    sub.validate()
    with pytest.raises(IndexError):
        sample.pair(len(sample))
    with pytest.raises(IndexError):
        sample.subset([0, 99])


def test_pair_returns_copies(sample):
    p = sample.pair(0)
    p.pos_relaxed[:] = 0.0
    assert np.abs(sample.pair(0).pos_relaxed).sum() > 0


def test_concatenate_equals_subset(sample):
    joined = PairSet.concatenate([sample.subset([3, 4]), sample.subset([10]), sample.subset([0])])
    assert_same(joined, sample.subset([3, 4, 10, 0]))
    with pytest.raises(ValueError):
        PairSet.concatenate([])


def test_concatenate_keeps_the_metadata_all_parts_share(sample):
    a, b = sample.subset([0, 1]), sample.subset([2])
    a.metadata = {"teacher": "SevenNet-0", "licence": "MIT", "run": 1}
    b.metadata = {"teacher": "SevenNet-0", "licence": "MIT", "run": 2}
    joined = PairSet.concatenate([a, b])
    assert joined.metadata == {"teacher": "SevenNet-0", "licence": "MIT", "concatenated_from": [a.metadata, b.metadata]}
    b.metadata = dict(a.metadata)
    assert PairSet.concatenate([a, b]).metadata == a.metadata


def _corrupt(sample, what):
    s = sample.subset(np.arange(len(sample)))
    if what == "offsets":
        s.offsets[2], s.offsets[3] = s.offsets[3], s.offsets[2]
    elif what == "nan":
        s.pos_relaxed[5, 1] = np.nan
    elif what == "det":
        s.cell_relaxed[4] = s.cell_relaxed[4][[1, 0, 2]]
    elif what == "duplicate":
        s.ids[1] = s.ids[0]
    elif what == "shape":
        s.cell_unrelaxed = s.cell_unrelaxed[:-1]
    elif what == "species":
        s.numbers[0] = 0
    return s


@pytest.mark.parametrize(
    "what, pattern",
    [
        ("offsets", "offsets not monotone"),
        ("nan", "pos_relaxed is not finite"),
        ("det", r"det\(cell_relaxed\)"),
        ("duplicate", "occurs 2 times"),
        ("shape", "cell_unrelaxed has shape"),
        ("species", "atomic number"),
    ],
)
def test_validate_names_the_problem_in_one_line(sample, what, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        _corrupt(sample, what).validate()
    assert "\n" not in str(info.value)


def test_validate_names_the_pair(sample):
    with pytest.raises(ValueError, match=sample.ids[4]):
        _corrupt(sample, "det").validate()


def test_atoms_round_trip(sample):
    pairs = sample.to_atoms_pairs()
    assert pairs[0][0].info["role"] == "unrelaxed" and pairs[0][1].info["role"] == "relaxed"
    assert pairs[0][1].get_potential_energy() == pytest.approx(sample.energy_per_atom_relaxed[0] * sample.n_atoms[0])
    back = PairSet.from_atoms_pairs(pairs)
    assert_same(back, sample)


def test_from_atoms_pairs_refuses_mismatches(sample):
    unrelaxed, relaxed = sample.to_atoms_pairs()[6]  # 9 atoms, three species
    n = len(relaxed)
    assert relaxed.numbers[0] != relaxed.numbers[-1]
    swapped = relaxed[[n - 1] + list(range(1, n - 1)) + [0]]
    with pytest.raises(ValueError, match=f"pair '{sample.ids[6]}'.*order differ"):
        PairSet.from_atoms_pairs([(unrelaxed, swapped)])
    other = relaxed.copy()
    other.numbers[0] = 1
    with pytest.raises(ValueError, match="species differ"):
        PairSet.from_atoms_pairs([(unrelaxed, other)], ids=["x1"])
    with pytest.raises(ValueError, match="'x2': unrelaxed has 9 atoms but relaxed has 8"):
        PairSet.from_atoms_pairs([(unrelaxed, relaxed[:-1])], ids=["x2"])


def test_save_is_atomic_and_refuses_inputs(tmp_path, sample):
    path = tmp_path / "pairs.npz"
    save_pairs(path, sample.subset([0]))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite input"):
        save_pairs(path, sample, inputs=[path])
    assert path.read_bytes() == before
    bad = _corrupt(sample, "nan")
    with pytest.raises(ValueError):
        save_pairs(path, bad)
    assert path.read_bytes() == before  # a failed write leaves the old file
    save_pairs(path, sample)
    assert len(load_pairs(path)) == len(sample)
    assert sorted(os.listdir(tmp_path)) == ["pairs.npz"]  # no temp files left


def test_foreign_or_newer_files_are_refused(tmp_path, sample):
    path = save_pairs(tmp_path / "p.npz", sample)
    with np.load(path) as data:
        arrays = dict(data)
    np.savez_compressed(tmp_path / "new.npz", **{**arrays, "format_version": np.array(2)})
    with pytest.raises(ValueError, match="newer"):
        load_pairs(tmp_path / "new.npz")
    del arrays["pos_relaxed"]
    np.savez_compressed(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match="missing arrays pos_relaxed"):
        load_pairs(tmp_path / "missing.npz")


def test_extxyz_info_survives_round_trips(tmp_path):
    from e3relax_ase.training.data.importers import import_extxyz

    demo = import_extxyz(DEMO)
    assert demo.info[0]["teacher"] == "SevenNet-0" and demo.info[0]["steps"] == 57
    assert demo.info[0]["occupancy"]["1"] == {"W": 1}
    again = import_extxyz(save_pairs_extxyz(tmp_path / "again.extxyz", demo))
    assert_same(again, demo, atol=1e-7)
    via_npz = load_pairs(save_pairs(tmp_path / "demo.npz", again))
    assert_same(via_npz, demo, atol=1e-7)
