"""``e3relax-ase relax`` and ``e3relax-ase info``: outputs, options, formats, summary, entry points."""

import json
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.cli.relax_records import SUMMARY_KEYS
from e3relax_ase.io import structures
from e3relax_ase.io.checkpoint import file_sha256, save_checkpoint
from e3relax_ase.io.files import _KEEPS, format_losses
from e3relax_ase.io.provenance import read_cif_provenance
from e3relax_ase.io.structures import spacegroup_number
from e3relax_ase.testing import tiny_model
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_model(), {"name": "tiny-test", "training_data": "none", "metrics": {"coord_mae": 0.1}})
    return str(path)


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pt"
    save_checkpoint(path, tiny_model(), {"name": "tiny-untrained", "untrained": True})
    return str(path)


def run(args, checkpoint=None):
    extra = ["--checkpoint", checkpoint] if checkpoint and args and args[0] == "relax" else []
    return CliRunner().invoke(cli, args + extra, catch_exceptions=False)


def nacl(seed=0):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def ni_slab():
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.set_initial_magnetic_moments(np.full(len(slab), 0.6))
    slab.rattle(0.03, seed=1)
    del slab.info["adsorbate_info"]  # a dict: extxyz cannot store it (and warns)
    return slab


def test_relax_cif_next_to_input(tmp_path, checkpoint):
    source = tmp_path / "NaCl.cif"
    ase.io.write(source, nacl())
    before = source.read_bytes()
    result = run(["relax", str(source)], checkpoint)
    assert result.exit_code == 0, result.output
    relaxed = ase.io.read(tmp_path / "NaCl_relaxed.cif")
    assert len(relaxed) == 8 and not np.allclose(relaxed.cell.array, nacl().cell.array)
    assert source.read_bytes() == before
    assert result.stdout == ""  # quiet by default; nothing on stdout without --json


def test_output_file_dir_suffix_and_format(tmp_path, checkpoint):
    a, b = tmp_path / "a.cif", tmp_path / "POSCAR"
    ase.io.write(a, nacl())
    ase.io.write(b, bulk("Si", cubic=True), format="vasp")
    assert run(["relax", str(a), "-o", str(tmp_path / "x.extxyz")], checkpoint).exit_code == 0
    assert "e3relax_model" in ase.io.read(tmp_path / "x.extxyz").info
    assert run(["relax", str(a), str(b), "-o", str(tmp_path / "out")], checkpoint).exit_code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["POSCAR", "a.cif"]
    assert run(["relax", str(a), str(b), "--suffix", "_pre", "--format", "traj"], checkpoint).exit_code == 0
    assert ase.io.read(tmp_path / "a_pre.traj").info["e3relax_model"] == "tiny.pt"
    assert ase.io.read(tmp_path / "POSCAR_pre.traj", format="traj").get_chemical_formula() == "Si8"  # ASE guesses vasp from the name
    assert run(["relax", str(b)], checkpoint).exit_code == 0
    assert ase.io.read(tmp_path / "POSCAR_relaxed", format="vasp").get_chemical_formula() == "Si8"


def test_multiframe_extxyz(tmp_path, checkpoint):
    source = tmp_path / "many.extxyz"
    ase.io.write(source, [nacl(0), ni_slab(), nacl(1)])
    result = run(["relax", str(source), "--json"], checkpoint)
    assert result.exit_code == 0, result.output
    frames = ase.io.read(tmp_path / "many_relaxed.extxyz", ":")
    assert [len(f) for f in frames] == [8, 12, 8]
    slab = frames[1]
    assert np.allclose(slab.get_initial_magnetic_moments(), 0.6) and list(slab.pbc) == [True, True, False]
    assert [type(c).__name__ for c in slab.constraints] == ["FixAtoms"]
    summary = json.loads(result.stdout)
    assert [r["input"] for r in summary["results"]] == [f"{source}@{i}" for i in range(3)]
    # A format holding one structure per file gets one file per frame.
    assert run(["relax", str(source), "--format", "vasp", "-o", str(tmp_path / "vasp") + os.sep], checkpoint).exit_code == 0
    assert sorted(os.listdir(tmp_path / "vasp")) == ["many_0.vasp", "many_1.vasp", "many_2.vasp"]


def test_traj_and_db_inputs(tmp_path, checkpoint):
    ase.io.write(tmp_path / "in.traj", [nacl(0), nacl(1)])
    ase.io.write(tmp_path / "in.db", [nacl(2), ni_slab()])
    result = run(["relax", str(tmp_path / "in.traj"), str(tmp_path / "in.db"), "--json"], checkpoint)
    assert result.exit_code == 0, result.output
    assert len(ase.io.read(tmp_path / "in_relaxed.traj", ":")) == 2
    from_db = ase.io.read(tmp_path / "in_relaxed.db", ":")
    assert [len(f) for f in from_db] == [8, 12] and list(from_db[1].pbc) == [True, True, False]
    assert json.loads(result.stdout)["n_ok"] == 4


def test_json_summary(tmp_path, checkpoint):
    source = tmp_path / "NaCl.cif"
    ase.io.write(source, nacl())
    result = run(["relax", str(source), "--json"], checkpoint)
    summary = json.loads(result.stdout)
    assert summary["checkpoint"] == {"name": "tiny.pt", "sha256": file_sha256(checkpoint), "untrained": False}
    assert (summary["n_ok"], summary["n_failed"], summary["n_skipped"]) == (1, 0, 0)
    entry = summary["results"][0]
    assert entry["status"] == "ok" and entry["output"] == str(tmp_path / "NaCl_relaxed.cif")
    assert entry["sane"] is True and entry["max_displacement"] > 0 and "converged" not in entry
    # Each result field holds the value of the info key of its name in the structure written.
    written = read_cif_provenance((tmp_path / "NaCl_relaxed.cif").read_text())
    reported = {name: entry[name] for name in SUMMARY_KEYS if name in entry}
    assert len(reported) >= 6 and reported == {name: written[f"e3relax_{name}"] for name in SUMMARY_KEYS if f"e3relax_{name}" in written}


def test_json_summary_fields_are_the_declared_info_keys_less_their_prefix():
    # Both names are public (docs/relaxer.md), and the CLI derives the field from the info key
    # declared in io/structures.py: renaming a key there would rename a --json field.
    fields = ("sane", "problems", "max_displacement", "max_strain", "correction_ratio", "refine_advised")
    fields += ("spacegroup_input", "spacegroup", "vacuum_axes", "cluster", "converged", "nsteps", "fmax", "fmax_atoms", "fmax_cell")
    assert SUMMARY_KEYS == {name: f"e3relax_{name}" for name in fields}
    declared = {value for name, value in vars(structures).items() if name.startswith("INFO_")}
    assert set(SUMMARY_KEYS.values()) <= declared


def test_options_no_relax_cell_fix_symmetry_refine(tmp_path, checkpoint):
    source = tmp_path / "Cu.extxyz"
    ase.io.write(source, bulk("Cu", "fcc", a=3.75, cubic=True))
    result = run(["relax", str(source), "--no-relax-cell", "-o", str(tmp_path / "fixed.extxyz")], checkpoint)
    assert result.exit_code == 0
    assert np.array_equal(ase.io.read(tmp_path / "fixed.extxyz").cell.array, ase.io.read(source).cell.array)
    result = run(["relax", str(source), "--fix-symmetry", "--symprec", "1e-3", "-o", str(tmp_path / "sym.extxyz")], checkpoint)
    assert spacegroup_number(ase.io.read(tmp_path / "sym.extxyz"), 1e-5) == 225
    result = run(
        [
            "relax",
            str(source),
            "--refine",
            "emt",
            "--fmax",
            "0.02",
            "--steps",
            "200",
            "--pressure",
            "0.5",
            "--json",
            "-o",
            str(tmp_path / "emt.extxyz"),
        ],
        checkpoint,
    )
    entry = json.loads(result.stdout)["results"][0]
    assert entry["converged"] is True and entry["fmax"] < 0.02 and entry["nsteps"] > 0
    refined = ase.io.read(tmp_path / "emt.extxyz")
    assert refined.info["e3relax_converged"] is True
    assert (
        run(
            ["relax", str(source), "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "-o", str(tmp_path / "b.extxyz")],
            checkpoint,
        ).exit_code
        == 0
    )


def test_untrained_checkpoint_warns(tmp_path, untrained_checkpoint):
    source = tmp_path / "NaCl.cif"
    ase.io.write(source, nacl())
    result = run(["relax", str(source), "-q"], untrained_checkpoint)
    assert result.exit_code == 0
    assert "UNTRAINED" in result.stderr and "meaningless" in result.stderr
    assert result.stderr.count("UNTRAINED") == 1


def test_format_loss_warning(tmp_path, checkpoint):
    source = tmp_path / "slab.extxyz"
    ase.io.write(source, ni_slab())
    result = run(["relax", str(source), "--format", "cif", "--json"], checkpoint)
    assert result.exit_code == 0
    assert "the cif format drops constraints (FixAtoms), initial magnetic moments, non-periodic axes" in result.stderr
    assert "initial magnetic moments" in json.loads(result.stdout)["results"][0]["dropped"]
    result = run(["relax", str(source), "--format", "extxyz", "--suffix", "_x"], checkpoint)
    assert "drops" not in result.stderr


@pytest.mark.parametrize("fmt", sorted(_KEEPS))
def test_format_loss_table_is_true(tmp_path, fmt):
    """Round-trip through each format: what format_losses promises is what ASE writes."""
    slab = ni_slab()
    slab.set_initial_charges(np.full(len(slab), 0.1))
    slab.set_tags(np.arange(len(slab)))
    path = tmp_path / f"slab.{fmt}"
    ase.io.write(path, slab, format=fmt)
    back = ase.io.read(path, format=fmt)
    losses = " ".join(format_losses(slab, fmt))
    assert ("FixAtoms" in losses) == (not back.constraints)
    assert ("magnetic" in losses) == (not np.any(back.get_initial_magnetic_moments()))
    assert ("charges" in losses) == (not np.any(back.get_initial_charges()))
    assert ("tags" in losses) == (not np.any(back.get_tags()))
    assert ("non-periodic" in losses) == bool(back.pbc.all())


def test_resume_skips_existing_outputs(tmp_path, checkpoint):
    a, b = tmp_path / "a.cif", tmp_path / "b.cif"
    ase.io.write(a, nacl(0))
    ase.io.write(b, nacl(1))
    (tmp_path / "a_relaxed.cif").write_text("keep me")
    result = run(["relax", str(a), str(b), "--resume", "--json"], checkpoint)
    summary = json.loads(result.stdout)
    assert [r["status"] for r in summary["results"]] == ["skipped", "ok"]
    assert (tmp_path / "a_relaxed.cif").read_text() == "keep me"
    assert (tmp_path / "b_relaxed.cif").exists()


def test_folder_input(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    ase.io.write(folder / "a.cif", nacl(0))
    ase.io.write(folder / "POSCAR_b", nacl(1), format="vasp")
    (folder / "notes.txt").write_text("not a structure")
    result = run(["relax", str(folder), "-o", str(tmp_path / "out"), "--json"], checkpoint)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["n_ok"] == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["POSCAR_b", "a.cif"]


def test_info_command(checkpoint):
    result = run(["info", checkpoint])
    assert result.exit_code == 0
    assert "tiny.pt" in result.stdout and file_sha256(checkpoint) in result.stdout and "coord_mae=0.1" in result.stdout
    data = json.loads(run(["info", checkpoint, "--json"]).stdout)
    assert data["parameters"] == tiny_model().count_parameters()
    assert data["config"]["num_channels"] == 16 and data["training_data"] == "none"
    assert set(data["versions"]["running"]) >= {"e3relax_ase", "torch", "e3nn", "python"}
    default = json.loads(run(["info", "--json"]).stdout)
    assert default["default"] is True and len(default["sha256"]) == 64
    assert run(["info", "no-such-checkpoint"]).exit_code == 1


def test_python_m_entry_point_and_fast_help(tmp_path, checkpoint):
    source = tmp_path / "NaCl.cif"
    ase.io.write(source, nacl())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "e3relax_ase", "relax", str(source), "--checkpoint", checkpoint, "--json", "-o", str(tmp_path / "out.cif")],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_ok"] == 1 and (tmp_path / "out.cif").exists()
    probe = (
        "import sys; from e3relax_ase.cli.main import main\n"
        "codes = [main(['--help']), main(['relax', '--help']), main(['info', '--help'])]\n"
        "heavy = [m for m in ('torch', 'ase', 'pymatgen', 'numpy') if m in sys.modules]\n"
        "print(codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 0] []"
    assert "--fix-symmetry" in done.stdout and "--refine" in done.stdout


def test_workers_option_gives_the_same_file_and_checks_its_value(tmp_path, checkpoint):
    frames = [nacl(seed) for seed in range(6)]
    ase.io.write(tmp_path / "many.extxyz", frames)
    outputs = {}
    for workers in ("0", "2", "auto"):
        out = tmp_path / f"out_{workers}.extxyz"
        result = run(["relax", str(tmp_path / "many.extxyz"), "-o", str(out), "--workers", workers], checkpoint)
        assert result.exit_code == 0, result.output
        outputs[workers] = ase.io.read(out, index=":")
    for workers in ("2", "auto"):
        for a, b in zip(outputs["0"], outputs[workers]):
            assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell.array, b.cell.array)
    result = CliRunner().invoke(
        cli, ["relax", str(tmp_path / "many.extxyz"), "-o", str(tmp_path / "x.extxyz"), "--workers", "many", "--checkpoint", checkpoint]
    )
    assert result.exit_code == 2 and "neither 'auto' nor a number" in result.output


def test_auto_workers_follow_the_device_and_the_cores(monkeypatch):
    import torch

    from e3relax_ase.relax import pool

    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert pool.auto_num_workers(torch.device("cpu")) == 0
    assert pool.auto_num_workers(torch.device("cuda", 1)) == 14  # at most AUTO_MAX_WORKERS
    assert pool.auto_num_workers(torch.device("cuda", 0), processes_per_host=2) == 14  # 32 // 2 - 2
    assert pool.auto_num_workers(torch.device("cuda", 0), processes_per_host=8) == 3  # 32 // 8 - 1 (a small share)
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert pool.auto_num_workers(torch.device("cuda", 0)) == 0
