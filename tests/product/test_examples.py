"""Every example runs (in-process, default checkpoint) and writes what it promises."""

import runpy
import sys

import ase.io
import pytest

from tests.paths import ROOT

EXAMPLES = ROOT / "examples"


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def run_example(name, out, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), str(out)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_relax_cif(tmp_path, monkeypatch):
    run_example("relax_cif.py", tmp_path, monkeypatch)
    relaxed = ase.io.read(tmp_path / "NaCl_relaxed.extxyz")
    assert relaxed.info["e3relax_sane"] in (True, False) and "e3relax_checkpoint_sha256" in relaxed.info
    assert len(ase.io.read(tmp_path / "NaCl_relaxed.cif")) >= 2


def test_relax_folder(tmp_path, monkeypatch):
    run_example("relax_folder.py", tmp_path, monkeypatch)
    frames = ase.io.read(tmp_path / "relaxed.extxyz", ":")
    assert sorted(f.get_chemical_formula() for f in frames) == ["Al4", "Cu4", "MgO", "Si8"]


def test_prerelax_vasp(tmp_path, monkeypatch):
    run_example("prerelax_vasp.py", tmp_path, monkeypatch)
    incar = (tmp_path / "vasp" / "INCAR").read_text()
    poscar = (tmp_path / "vasp" / "POSCAR").read_text()
    assert "MAGMOM = 16*0.6" in incar
    assert "Selective dynamics" in poscar and " F F F" in poscar
    assert (tmp_path / "vasp" / "POTCAR.spec").exists()


def test_prerelax_gpaw(tmp_path, monkeypatch):
    run_example("prerelax_gpaw.py", tmp_path, monkeypatch)
    assert len(ase.io.read(tmp_path / "si_prerelaxed.traj")) == 2
    script = (tmp_path / "gpaw_relax.py").read_text()
    compile(script, "gpaw_relax.py", "exec")
    assert "GPAW(mode=PW(300)" in script


def test_relax_refine_emt(tmp_path, monkeypatch, capsys):
    run_example("relax_refine_emt.py", tmp_path, monkeypatch)
    relaxed = ase.io.read(tmp_path / "Cu_relaxed.extxyz")
    assert relaxed.info["e3relax_converged"] is True and relaxed.info["e3relax_fmax"] < 0.02
    assert abs(relaxed.cell.lengths()[0] / 2 - 3.590) < 0.01  # EMT's Cu lattice constant
    assert "OneShotThenOptimize: converged=True" in capsys.readouterr().out
    assert len(ase.io.read(tmp_path / "refine.traj", ":")) > 1
