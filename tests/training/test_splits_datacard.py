"""Splits, Dummy metrics, data card and plots, on real NREL pairs; the `data` CLI group."""

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.training.data.datacard import (
    aligned_displacements,
    dummy_metrics,
    per_structure_coordinate_mae,
    plot_statistics,
    write_data_card,
)
from e3relax_ase.training.data.pairs import PairSet, load_pairs
from e3relax_ase.training.data.splits import chemical_systems, split_by_chemical_system, split_keeping_systems, split_random
from tests.paths import ROOT, TEST_DATA

DATA = TEST_DATA
SAMPLE = DATA / "nrel_sample_pairs.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample():
    return load_pairs(SAMPLE)


def _check_partition(splits, n):
    joined = np.concatenate(list(splits.values()))
    assert sorted(joined.tolist()) == list(range(n))
    for idx in splits.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


# --- splits -------------------------------------------------------------------------------
def test_split_random(sample):
    splits = split_random(sample, (0.5, 0.25, 0.25), seed=1)
    _check_partition(splits, len(sample))
    assert [len(v) for v in splits.values()] == [8, 4, 4]
    again = split_random(sample, (0.5, 0.25, 0.25), seed=1)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    other = split_random(sample, (0.5, 0.25, 0.25), seed=2)
    assert not all(np.array_equal(splits[k], other[k]) for k in splits)
    with pytest.raises(ValueError, match="sum to 1"):
        split_random(sample, (0.5, 0.5, 0.5))


def test_chemical_systems(sample):
    systems = chemical_systems(sample)
    assert systems[0] == "As-Be-Na" and systems[-1] == "K-Sb" and len(set(systems)) == 6


def test_split_by_chemical_system_keeps_systems_whole(sample):
    systems = np.array(chemical_systems(sample))
    for seed in range(5):
        splits = split_by_chemical_system(sample, (0.5, 0.25, 0.25), seed=seed)
        _check_partition(splits, len(sample))
        seen = [set(systems[idx]) for idx in splits.values()]
        for a, b in itertools.combinations(seen, 2):
            assert not a & b
        assert all(len(idx) > 0 for idx in splits.values())
    a = split_by_chemical_system(sample, (0.5, 0.25, 0.25), seed=3)
    b = split_by_chemical_system(sample, (0.5, 0.25, 0.25), seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    no_test = split_by_chemical_system(sample, (0.5, 0.5, 0.0), seed=0)
    assert len(no_test["test"]) == 0


def test_split_keeping_systems_extends_without_leaking(sample):
    """New pairs of a system already split go where that system is; new systems fill the deficits."""
    systems = np.array(chemical_systems(sample))
    old_idx = np.flatnonzero(np.isin(systems, sorted(set(systems))[:4]))  # 4 of the 6 systems
    new_idx = np.setdiff1d(np.arange(len(sample)), old_idx)
    # "new" pairs: the 2 unseen systems, plus every old pair again under new ids.
    again = sample.subset(old_idx)
    again.ids = np.array([f"again-{i}" for i in again.ids])
    new = PairSet.concatenate([sample.subset(new_idx), again])
    old = sample.subset(old_idx)
    old_splits = split_by_chemical_system(old, (0.5, 0.25, 0.25), seed=0)
    existing = {name: old.subset(idx) for name, idx in old_splits.items()}
    home = {sys: name for name, part in existing.items() for sys in chemical_systems(part)}
    out = split_keeping_systems(new, existing, (0.5, 0.25, 0.25), seed=1)
    _check_partition(out, len(new))
    new_systems = np.array(chemical_systems(new))
    for name, idx in out.items():
        for system in new_systems[idx]:
            assert home.get(system, name) == name  # a known system never changes split
    unseen = {str(x) for x in new_systems if x not in home}
    assert len(unseen) == 2 and sum(len(out[n]) for n in out) == len(new)
    leaky = dict(existing, val=existing["train"])
    with pytest.raises(ValueError, match="in both the train and the val split"):
        split_keeping_systems(new, leaky, (0.5, 0.25, 0.25))


def test_data_split_extend_cli(tmp_path, sample):
    systems = np.array(chemical_systems(sample))
    first = sorted(set(systems))[:4]
    from e3relax_ase.training.data.pairs import save_pairs

    save_pairs(tmp_path / "old.npz", sample.subset(np.flatnonzero(np.isin(systems, first))))
    save_pairs(tmp_path / "new.npz", sample.subset(np.flatnonzero(~np.isin(systems, first))))
    r = _run(["data", "split", str(tmp_path / "old.npz"), "-o", str(tmp_path / "v1"), "--fractions", "0.5,0.25,0.25"])
    assert r.exit_code == 0, r.output
    r = _run(["data", "split", str(tmp_path / "new.npz"), "-o", str(tmp_path / "v2"), "--extend", str(tmp_path / "v1"), "--fractions", "0.5,0.25,0.25"])
    assert r.exit_code == 0, r.output
    v1 = {n: load_pairs(tmp_path / "v1" / f"{n}.npz") for n in ("train", "val", "test")}
    v2 = {n: load_pairs(tmp_path / "v2" / f"{n}.npz") for n in ("train", "val", "test")}
    assert sum(len(p) for p in v2.values()) == len(sample)
    for name in v1:  # the old split is the start of the new one, unchanged
        assert v2[name].ids[: len(v1[name])].tolist() == v1[name].ids.tolist()
    seen = [set(chemical_systems(p)) for p in v2.values()]
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    r = _run(["data", "split", str(tmp_path / "old.npz"), "-o", str(tmp_path / "v3"), "--extend", str(tmp_path / "v1")])
    assert r.exit_code != 0 and "already in" in r.output
    r = _run(["data", "split", str(tmp_path / "new.npz"), "-o", str(tmp_path / "v1"), "--extend", str(tmp_path / "v1")])
    assert r.exit_code != 0 and "never overwritten" in r.output


# --- Dummy metrics ------------------------------------------------------------------------
def _hand_pair():
    """One Cu4 pair: relaxed = unrelaxed with atom 2 wrapped by a lattice vector and moved 0.1 Å."""
    from ase.build import bulk

    unrelaxed = bulk("Cu", "fcc", a=3.6, cubic=True)
    relaxed = unrelaxed.copy()
    relaxed.positions[2] += relaxed.cell[0] + [0.1, 0.0, 0.0]
    return PairSet.from_atoms_pairs([(unrelaxed, relaxed)], ids=["cu"])


def test_periodic_alignment_on_a_hand_made_pair():
    pairs = _hand_pair()
    disp = aligned_displacements(pairs)
    np.testing.assert_allclose(disp[2], [-0.1, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(disp[[0, 1, 3]], 0.0, atol=1e-12)
    m = dummy_metrics(pairs)
    assert m["coord_mae_mean"] == pytest.approx(0.1 / 12)  # one |dx| of 0.1 over 4 atoms x 3
    assert m["volume_mae"] == pytest.approx(0.0, abs=1e-9)
    assert m["match_rate"] == 1.0


def test_coordinate_mae_agrees_with_a_brute_force_loop(sample):
    expected = []
    for k in range(len(sample)):
        p = sample.pair(k)
        errors = []
        for ru, rr in zip(p.pos_unrelaxed, p.pos_relaxed, strict=True):
            best = min(
                (ru + np.array(img) @ p.cell_relaxed - rr for img in itertools.product((-1, 0, 1), repeat=3)),
                key=np.linalg.norm,
            )
            errors.append(np.abs(best).mean())
        expected.append(np.mean(errors))
    np.testing.assert_allclose(per_structure_coordinate_mae(sample), expected, rtol=1e-12)
    m = dummy_metrics(sample, match_sample=4, seed=0)
    assert m["coord_mae_mean"] == pytest.approx(np.mean(expected))
    vol = np.abs(np.linalg.det(sample.cell_unrelaxed) - np.linalg.det(sample.cell_relaxed)).mean()
    assert m["volume_mae"] == pytest.approx(vol)
    assert m["match_n_tested"] == 4 and 0 <= m["match_n_matched"] <= 4
    assert m["volume_ratio_median"] > 1.0  # NREL inputs were not rescaled: they swell on relaxing


def test_data_card_and_plots(tmp_path, sample):
    splits = split_by_chemical_system(sample, (0.5, 0.25, 0.25), seed=0)
    metrics = write_data_card(
        tmp_path / "CARD.md",
        sample,
        splits,
        source="NREL sample",
        teacher="VASP PBE",
        licence="MIT",
        citation="Pandey et al., Patterns 2, 100361 (2021)",
        how_made="copied",
        split_rule="chemsys 0.5/0.25/0.25",
        match_sample=2,
    )
    text = (tmp_path / "CARD.md").read_text()
    assert set(metrics) == {"train", "val", "test"}
    for name, idx in splits.items():
        assert f"| {name} | {len(idx)} |" in text
        assert f"{metrics[name]['coord_mae_mean']:.3f}" in text
    assert f"| total | {len(sample)} | {int(sample.n_atoms.sum())} |" in text
    assert "As Be Bi Cd Cs K Na P Rb Sb Si Sn" in text
    assert "Pandey et al." in text and "random subsample of at most 2" in text
    paths = plot_statistics(sample, tmp_path / "plots")
    assert [p.name for p in paths] == ["displacement_hist.png", "volume_change_hist.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


# --- data CLI -----------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_data_cli_import_split_card_plot(tmp_path):
    demo = DATA / "sevennet0_demo_sample.extxyz"
    imported = tmp_path / "demo.npz"
    r = _run(["data", "import", str(demo), "-o", str(imported), "--teacher", "SevenNet-0", "--licence", "MIT"])
    assert r.exit_code == 0, r.output
    pairs = load_pairs(imported)
    assert len(pairs) == 4 and pairs.metadata["teacher"] == "SevenNet-0" and pairs.info[0]["steps"] == 57

    r = _run(
        [
            "data",
            "split",
            str(SAMPLE),
            "-o",
            str(tmp_path / "splits"),
            "--method",
            "chemsys",
            "--fractions",
            "0.5,0.25,0.25",
            "--seed",
            "0",
        ]
    )
    assert r.exit_code == 0, r.output
    parts = {n: load_pairs(tmp_path / "splits" / f"{n}.npz") for n in ("train", "val", "test")}
    expected = split_by_chemical_system(load_pairs(SAMPLE), (0.5, 0.25, 0.25), seed=0)
    assert {n: len(p) for n, p in parts.items()} == {n: len(v) for n, v in expected.items()}
    assert parts["val"].metadata["split"]["method"] == "chemsys"

    r = _run(["data", "split", str(SAMPLE), "-o", str(tmp_path / "idx.json"), "--method", "random"])
    assert r.exit_code == 0, r.output
    idx = json.loads((tmp_path / "idx.json").read_text())
    assert sorted(idx["train"] + idx["val"] + idx["test"]) == list(range(16))

    card = tmp_path / "DATACARD.md"
    files = [str(tmp_path / "splits" / f"{n}.npz") for n in ("train", "val", "test")]
    r = _run(["data", "card", *files, "-o", str(card), "--match-sample", "2", "--title", "NREL sample"])
    assert r.exit_code == 0, r.output
    text = card.read_text()
    assert text.startswith("# NREL sample") and "Pandey" in text and "method chemsys" in text

    r = _run(["data", "plot", str(SAMPLE), "-o", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plots" / "volume_change_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_data_cli_errors(tmp_path):
    r = _run(["data", "import", str(SAMPLE), "-o", str(SAMPLE)])
    assert r.exit_code != 0 and "refusing to overwrite input" in r.output
    r = _run(["data", "split", str(SAMPLE), "-o", str(tmp_path / "s"), "--fractions", "0.5,0.5,0.5"])
    assert r.exit_code != 0 and "summing to 1" in r.output
    bad = tmp_path / "bad.npz"
    np.savez_compressed(bad, ids=np.array(["a"]))
    r = _run(["data", "card", str(bad), "-o", str(tmp_path / "c.md")])
    assert r.exit_code != 0 and "missing arrays" in r.output


def test_committed_distilled_v2_keeps_part_1_splits_and_unseen_test_systems():
    """data/sevennet0_distilled_v2 extends part 1 without moving a pair or leaking a chemical system:
    the shipped checkpoint's test split (part 1's) must stay unseen by any v2 training run."""
    root = ROOT / "data"
    part1 = {s: load_pairs(root / "sevennet0_distilled" / f"{s}.npz", validate=False) for s in ("train", "val", "test")}
    v2 = {s: load_pairs(root / "sevennet0_distilled_v2" / f"{s}.npz", validate=False) for s in ("train", "val", "test")}
    ids = {s: set(v2[s].ids.tolist()) for s in v2}
    assert sum(len(v) for v in ids.values()) == sum(len(p) for p in v2.values()) >= 50_000  # ids unique overall
    for s in part1:
        assert set(part1[s].ids.tolist()) <= ids[s]
    systems = {s: set(chemical_systems(v2[s])) for s in v2}
    assert not systems["train"] & systems["test"]
    assert not systems["train"] & systems["val"]
    assert not systems["val"] & systems["test"]
