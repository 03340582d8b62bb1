"""``e3relax-ase relax`` under torchrun: 2 CPU processes (gloo) write what 1 process writes."""

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.distributed import World, gather_ordered, launched_by_torchrun, shard
from e3relax_ase.io.checkpoint import save_checkpoint
from e3relax_ase.testing import tiny_model
from tests.training.test_ddp import torchrun

BAD_FRAME = 5  # an odd index: rank 1 meets the failure and rank 0 must report it


def frames() -> list:
    """Eight small crystals of 1 to 8 atoms, and one with two atoms on top of each other."""
    structures = [
        bulk("Cu", "fcc", a=3.6),
        bulk("Si", "diamond", a=5.43),
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        bulk("Fe", "bcc", a=2.87, cubic=True),
        bulk("MgO", "rocksalt", a=4.21),
        bulk("Al", "fcc", a=4.05, cubic=True),
        bulk("Ti", "hcp", a=2.95, c=4.68),
        bulk("GaAs", "zincblende", a=5.65),
    ]
    for seed, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=seed)
        atoms.info["name"] = f"s{seed}"
    overlapping = bulk("Cu", "fcc", a=3.6, cubic=True)
    overlapping.positions[1] = overlapping.positions[0] + 0.01
    structures.insert(BAD_FRAME, overlapping)
    return structures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_model(), {"name": "tiny-test", "training_data": "none"})
    return str(path)


def _entries(summary: dict) -> list:
    return [(r["input"], r["frame"], r["status"], r["error"]) for r in summary["results"]]


def test_two_processes_write_what_one_process_writes(tmp_path, checkpoint):
    structures = frames()
    ase.io.write(tmp_path / "many.extxyz", structures, format="extxyz")
    folder = tmp_path / "folder"  # a folder of a 3-row ASE db and a CIF
    folder.mkdir()
    ase.io.write(folder / "rows.db", [bulk("Ni", "fcc", a=3.52), bulk("W", "bcc", a=3.16), bulk("C", "diamond", a=3.57)])
    ase.io.write(folder / "zns.cif", bulk("ZnS", "zincblende", a=5.41))
    args = ["relax", str(tmp_path / "many.extxyz"), str(folder), "--checkpoint", checkpoint, "--device", "cpu", "--json"]

    one = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "one") + "/"], catch_exceptions=False)
    assert one.exit_code == 1  # the overlapping frame fails; every other one is written
    # A flush every 4 structures (2 per rank): the extxyz goes alone (9), the db and the CIF together,
    # starting at overall index 9, so the round robin must carry on across chunks.
    two = torchrun(2, args + ["--chunk-size", "2", "-o", str(tmp_path / "two") + "/"], tmp_path, setup="")
    assert two.returncode == 1, two.stderr[-4000:]

    summary_one, summary_two = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints
    assert _entries(summary_two) == _entries(summary_one)
    failed = [r for r in summary_two["results"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["frame"] == BAD_FRAME and "overlapping atoms" in failed[0]["error"]

    for name, n_frames in (("many.extxyz", len(structures) - 1), ("rows.db", 3), ("zns.cif", 1)):
        relaxed_one = ase.io.read(tmp_path / "one" / name, ":")
        relaxed_two = ase.io.read(tmp_path / "two" / name, ":")
        assert len(relaxed_two) == len(relaxed_one) == n_frames, name
        for a, b in zip(relaxed_one, relaxed_two):
            # CPU, float64, one structure per forward pass: bitwise the same on any rank.
            assert np.array_equal(a.numbers, b.numbers)
            assert np.array_equal(a.positions, b.positions)
            assert np.array_equal(a.cell.array, b.cell.array)
            assert a.info == b.info
    assert (tmp_path / "two" / "many.extxyz").read_bytes() == (tmp_path / "one" / "many.extxyz").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["many.extxyz", "rows.db", "zns.cif"]  # no temporary files


def test_other_ranks_follow_rank_0s_claims(tmp_path, checkpoint):
    """Rank 1 reading every lock as another live run's (as it would a lock caught half written)
    must not change what it relaxes: rank 0 alone decides, or the ranks' lists differ and the
    job hangs or loses rank 0's summary."""
    folder = tmp_path / "cifs"
    folder.mkdir()
    for name, atoms in (("cu", bulk("Cu", "fcc", a=3.6)), ("si", bulk("Si", "diamond", a=5.43)), ("w", bulk("W", "bcc", a=3.16))):
        ase.io.write(folder / f"{name}.cif", atoms)
    foreign = "import socket, e3relax_ase.io.claims as c; c._read = (lambda lock: {'run': 'another', 'host': socket.gethostname(), 'pid': 1}) if os.environ['RANK'] == '1' else c._read"  # noqa: E501
    args = ["relax", str(folder), "--checkpoint", checkpoint, "--device", "cpu", "--json", "--chunk-size", "1", "-o", str(tmp_path / "out") + "/"]
    two = torchrun(2, args, tmp_path, setup=foreign)
    assert two.returncode == 0, two.stderr[-4000:]
    summary = json.loads(two.stdout)
    assert [r["status"] for r in summary["results"]] == ["ok"] * 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cu.cif", "si.cif", "w.cif"]


def test_shards_are_round_robin_over_the_whole_input():
    two = [World(rank, 2) for rank in range(2)]
    assert list(shard(5, two[0])) == [0, 2, 4] and list(shard(5, two[1])) == [1, 3]
    # A later chunk that starts at overall index 5: index 0 in it is overall 5, rank 1's.
    assert list(shard(4, two[0], start=5)) == [1, 3] and list(shard(4, two[1], start=5)) == [0, 2]
    three = [World(rank, 3) for rank in range(3)]
    for start in range(4):
        covered = sorted(i for world in three for i in shard(7, world, start))
        assert covered == list(range(7))
        for world in three:
            assert all((start + i) % 3 == world.rank for i in shard(7, world, start))


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not launched_by_torchrun()
    assert gather_ordered({1: "b", 0: "a"}, 2, World()) == ["a", "b"]
    assert World().device("auto") == "auto"


def test_distributed_flag_outside_torchrun_is_refused(tmp_path, checkpoint, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    source = tmp_path / "one.extxyz"
    ase.io.write(source, frames()[0])
    result = CliRunner().invoke(cli, ["relax", str(source), "--checkpoint", checkpoint, "--distributed"])
    assert result.exit_code == 2 and "torchrun" in result.output
