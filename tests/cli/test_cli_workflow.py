"""The workflow around the prediction (issue 18): progress, a closing line, refinement controls,
CIF with provenance and symmetry, clusters and vacuum, start-up imports."""

import json
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from e3relax_ase.io.checkpoint import file_sha256
from e3relax_ase.io.provenance import read_cif_provenance
from e3relax_ase.io.structures import spacegroup_number
from tests.cli_helpers import nacl, run_relax, save_tiny_checkpoint
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def relax(args, checkpoint):
    return run_relax(args, checkpoint, json=False)


def copper(seed=0, a=3.75):
    atoms = bulk("Cu", "fcc", a=a, cubic=True)
    atoms.rattle(0.03, seed=seed)
    return atoms


def test_progress_bar_counts_structures_of_every_input(tmp_path, checkpoint):
    ase.io.write(tmp_path / "three.extxyz", [nacl(0), nacl(1), nacl(2)])
    ase.io.write(tmp_path / "one.cif", nacl(3))
    inputs = [str(tmp_path / "three.extxyz"), str(tmp_path / "one.cif")]
    result = relax([*inputs, "--progress"], checkpoint)
    assert result.exit_code == 0
    assert "relaxing" in result.stderr and "4/4" in result.stderr and "structure/s" in result.stderr
    quiet = relax([*inputs, "--suffix", "_b"], checkpoint)  # stderr is not a terminal: no bar unless asked
    assert quiet.exit_code == 0 and "structure/s" not in quiet.stderr and "4/4" not in quiet.stderr


def test_closing_line_says_what_was_relaxed_failed_and_written(tmp_path, checkpoint):
    source = tmp_path / "in.cif"
    ase.io.write(source, nacl())
    result = relax([str(source), "-o", str(tmp_path / "out.cif")], checkpoint)
    assert result.exit_code == 0 and result.stdout == ""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("e3relax-ase: relaxed 1 structure in ") and line.endswith(f"wrote {tmp_path / 'out.cif'}")
    bad = tmp_path / "bad.extxyz"
    broken = nacl()
    broken.positions[1] = broken.positions[0]
    ase.io.write(bad, [nacl(1), broken])
    result = relax([str(bad)], checkpoint)
    assert result.exit_code == 1 and "e3relax-ase: relaxed 1 structure in " in result.stderr and "; 1 failed; wrote " in result.stderr
    assert relax([str(source), "-o", str(tmp_path / "q.cif"), "-q"], checkpoint).stderr == ""


def test_refinement_controls_on_the_command_line(tmp_path, checkpoint):
    source = tmp_path / "cu.extxyz"
    ase.io.write(source, [copper(0), copper(1)])
    trajectory, log = tmp_path / "steps.traj", tmp_path / "opt.log"
    args = [str(source), "--refine", "emt", "--optimizer", "BFGS", "--cell-filter", "UnitCellFilter", "--fmax", "0.03",
            "--steps", "200", "--trajectory", str(trajectory), "--logfile", str(log), "--json",
            "-o", str(tmp_path / "out.extxyz")]  # fmt: skip
    result = relax(args, checkpoint)
    assert result.exit_code == 0, result.stderr
    entries = json.loads(result.stdout)["results"]
    for entry in entries:
        assert entry["converged"] is True and entry["fmax_atoms"] < 0.03 and entry["fmax_cell"] < 0.03
    frames = ase.io.read(trajectory, ":")  # one multi-frame file, every structure's steps in turn
    assert len(frames) == sum(e["nsteps"] + 1 for e in entries)
    assert [int(f.info["e3relax_index"]) for f in frames] == [0] * (entries[0]["nsteps"] + 1) + [1] * (entries[1]["nsteps"] + 1)
    assert log.read_text().count("BFGS:") >= len(frames)
    refined = ase.io.read(tmp_path / "out.extxyz", ":")
    assert all(frame.info["e3relax_converged"] is True for frame in refined)

    per_structure = tmp_path / "traj"
    args = [str(source), "--refine", "emt", "--cell-filter", "none", "--trajectory", f"{per_structure}/",
            "-o", str(tmp_path / "fixed.extxyz")]  # fmt: skip
    assert relax(args, checkpoint).exit_code == 0
    assert sorted(os.listdir(per_structure)) == sorted(f"{str(source).replace('/', '_')}@{i}.traj" for i in (0, 1))
    for fixed in ase.io.read(tmp_path / "fixed.extxyz", ":"):
        assert "e3relax_fmax_cell" not in fixed.info and "e3relax_fmax_atoms" in fixed.info  # positions only: no cell criterion
    again = [str(source), "--refine", "emt", "--trajectory", f"{per_structure}/", "-o", str(tmp_path / "again.extxyz")]
    result = relax(again, checkpoint)  # the per-structure files exist: those structures are not refined over them
    assert result.exit_code == 1 and result.stderr.count("exists (this run did not write it); --overwrite replaces it") == 2
    assert relax([*again, "--overwrite"], checkpoint).exit_code == 0
    result = relax([str(source), "--refine", "emt", "--trajectory", str(tmp_path / "t{index}.traj")], checkpoint)
    assert result.exit_code == 2 and "use {name}" in result.stderr

    result = relax([str(source), "--refine", "emt", "--trajectory", str(trajectory), "-o", str(tmp_path / "again.extxyz")], checkpoint)
    assert result.exit_code == 2 and "exists (this run did not write it)" in result.stderr
    result = relax([str(source), "--refine", "emt", "--optimizer", "Newton", "-o", str(tmp_path / "x.extxyz")], checkpoint)
    assert result.exit_code == 2 and "'Newton': use one of FIRE" in result.stderr


def test_cif_output_carries_provenance(tmp_path, checkpoint):
    source = tmp_path / "in.cif"
    ase.io.write(source, nacl())
    output = tmp_path / "out.cif"
    result = relax([str(source), "-o", str(output), "--json"], checkpoint)
    assert result.exit_code == 0
    keys = read_cif_provenance(output.read_text())
    assert keys["e3relax_model"] == "tiny.pt" and keys["e3relax_checkpoint_sha256"] == file_sha256(checkpoint)
    assert keys["e3relax_source"] == str(source) and keys["e3relax_index"] == 0 and keys["e3relax_sane"] is True
    assert keys["e3relax_problems"] == "" and keys["e3relax_version"]
    entry = json.loads(result.stdout)["results"][0]
    assert keys["e3relax_max_displacement"] == entry["max_displacement"]  # the same number, all digits
    back = ase.io.read(output)
    assert len(back) == 8 and back.cell.cellpar() == pytest.approx(ase.io.read(output).cell.cellpar())


def test_symprec_writes_the_symmetrized_cif(tmp_path, checkpoint):
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    source = tmp_path / "in.cif"
    ase.io.write(source, bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    plain, symmetric = tmp_path / "p1.cif", tmp_path / "sym.cif"
    assert relax([str(source), "-o", str(plain), "--fix-symmetry"], checkpoint).exit_code == 0
    assert relax([str(source), "-o", str(symmetric), "--fix-symmetry", "--symprec", "0.01"], checkpoint).exit_code == 0
    text = symmetric.read_text()
    assert "_symmetry_space_group_name_H-M   Fm-3m" in text and "P 1" in plain.read_text()
    rows = [line for line in text.split("loop_")[-1].strip().splitlines() if not line.strip().startswith("_")]
    assert [row.split()[:3] for row in rows] == [["Na", "Na0", "4"], ["Cl", "Cl1", "4"]]  # the asymmetric unit
    assert read_cif_provenance(text)["e3relax_spacegroup"] == 225
    back_symmetric = Structure.from_file(symmetric)
    back_plain = Structure.from_file(plain)
    assert len(back_symmetric) == len(back_plain) == 8
    assert StructureMatcher(ltol=1e-4, stol=1e-4, angle_tol=1e-3).fit(back_symmetric, back_plain)
    assert spacegroup_number(ase.io.read(symmetric), 1e-4) == 225


def test_cluster_refused_unless_allowed_and_slab_vacuum_kept(tmp_path, checkpoint):
    water = molecule("H2O")
    water.set_cell([10.0, 10.0, 10.0])
    water.center()
    water.pbc = True
    ase.io.write(tmp_path / "water.extxyz", water)
    result = relax([str(tmp_path / "water.extxyz")], checkpoint)
    assert result.exit_code == 1 and "an isolated cluster or molecule in a periodic box" in result.stderr
    assert "--allow-cluster" in result.stderr and not (tmp_path / "water_relaxed.extxyz").exists()
    result = relax([str(tmp_path / "water.extxyz"), "--allow-cluster"], checkpoint)
    assert result.exit_code == 0
    assert np.array_equal(ase.io.read(tmp_path / "water_relaxed.extxyz").cell.array, water.cell.array)

    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0, periodic=True)
    del slab.info["adsorbate_info"]  # a dict: extxyz cannot store it
    ase.io.write(tmp_path / "slab.extxyz", slab)
    result = relax([str(tmp_path / "slab.extxyz")], checkpoint)
    assert result.exit_code == 0 and "vacuum of 12.0 Å along axis 2" in result.stderr and "kept as given" in result.stderr
    assert np.array_equal(ase.io.read(tmp_path / "slab_relaxed.extxyz").cell.array[2], slab.cell.array[2])


def test_relax_of_one_cif_imports_neither_pymatgen_nor_the_optimizers(tmp_path, checkpoint):
    """Start-up (issue 18 item 6): what a plain relax of one CIF must not import; the time
    itself is measured by benchmarks/bench_startup.py."""
    source = tmp_path / "one.cif"
    ase.io.write(source, nacl())
    probe = (
        "import sys\nfrom e3relax_ase.cli.main import main\n"
        f"code = main(['relax', {str(source)!r}, '--checkpoint', {checkpoint!r}, '-q'])\n"
        "print(code, [m for m in ('pymatgen', 'ase.optimize', 'e3relax_ase.relax.refine') if m in sys.modules])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"


def test_a_busy_cpu_gets_one_torch_thread(monkeypatch, tmp_path, checkpoint):
    """OpenMP waits for its descheduled threads: on a loaded machine one thread beats two."""
    from e3relax_ase.relax import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert threads.threads_for_a_busy_cpu(2) == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert threads.threads_for_a_busy_cpu(2) == 2
    source = tmp_path / "in.cif"
    ase.io.write(source, nacl())
    result = relax([str(source), "--threads", "many"], checkpoint)
    assert result.exit_code == 2 and "neither 'auto' nor a number" in result.stderr
    assert relax([str(source), "--threads", "1"], checkpoint).exit_code == 0
