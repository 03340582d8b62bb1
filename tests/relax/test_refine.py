"""Refinement with a real calculator (ASE's EMT) and the drop-in OneShotThenOptimize optimizer."""

import logging

import ase.io
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS
from ase.units import GPa

from e3relax_ase.relax.optimizer import OneShotThenOptimize
from e3relax_ase.relax.refine import make_calculator, optimizer_class, refine
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import tiny_model

FCC_METALS = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52, "Pd": 3.89, "Ag": 4.09, "Pt": 3.92, "Au": 4.08}


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def relaxer():
    return OneShotRelaxer(tiny_model(), device="cpu")


def strained(symbol, seed=0, strain=1.03):
    atoms = bulk(symbol, "fcc", a=FCC_METALS[symbol] * strain, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def generalised_fmax(atoms, reference_cell=None) -> float:
    """Max force (atoms and cell rows) as FrechetCellFilter reports it, computed afresh with a new EMT.

    The filter's forces depend on its reference cell (where refinement started); by default
    the current cell, where the cell rows are the virial over the atom count.
    """
    probe = atoms.copy()
    probe.calc = EMT()
    if reference_cell is not None:
        probe.set_cell(reference_cell, scale_atoms=False)
    cell_filter = FrechetCellFilter(probe)
    probe.set_cell(atoms.cell.array, scale_atoms=False)
    probe.positions = atoms.positions
    forces = cell_filter.get_forces()
    return float(np.sqrt((forces**2).sum(axis=1)).max())


def atomic_fmax(atoms) -> float:
    probe = atoms.copy()
    probe.calc = EMT()
    return float(np.sqrt((probe.get_forces() ** 2).sum(axis=1)).max())


@pytest.mark.parametrize("symbol", sorted(FCC_METALS))
def test_refinement_converges_honestly(relaxer, symbol):
    atoms = strained(symbol, seed=len(symbol))
    start = relaxer.relax(atoms)  # where refinement starts: the one-shot prediction
    relaxed = relaxer.relax(atoms, refine=EMT(), fmax=0.05, steps=300)
    info = relaxed.info
    assert info["e3relax_converged"] is True
    assert 0 < info["e3relax_nsteps"] < 300
    assert not np.allclose(start.cell.array, relaxed.cell.array)  # the cell moved: a fresh filter differs
    measured = generalised_fmax(relaxed)  # a filter built on the final structure
    assert measured < 0.05
    assert info["e3relax_fmax"] == pytest.approx(measured, abs=1e-9)
    assert info["e3relax_fmax_atoms"] == pytest.approx(atomic_fmax(relaxed), abs=1e-12)
    assert max(info["e3relax_fmax_atoms"], info["e3relax_fmax_cell"]) == info["e3relax_fmax"]
    assert atomic_fmax(relaxed) < 0.05
    assert info["e3relax_refine_calculator"] == "EMT"


@pytest.mark.parametrize("symbol, strain, seed", [("Ni", 1.10, 0), ("Ag", 1.10, 0), ("Cu", 1.06, 2)])
def test_converged_means_every_force_below_fmax_when_evaluated_afresh(symbol, strain, seed):
    """Cases where FIRE on a FrechetCellFilter stops at its own fmax < 0.05 while the largest
    atomic force of the final structure is 0.053-0.055 eV/Å (the filter scales atomic forces
    by the deformation from where it started): refine carries on, or says not converged."""
    atoms = bulk(symbol, "fcc", a=FCC_METALS[symbol] * strain, cubic=True)
    atoms.rattle(0.05, seed=seed)
    result = refine(atoms, EMT(), fmax=0.05, steps=300)
    assert result.converged and atoms.info["e3relax_converged"] is True
    assert atomic_fmax(atoms) < 0.05 and generalised_fmax(atoms) < 0.05
    assert atoms.info["e3relax_fmax_atoms"] == pytest.approx(atomic_fmax(atoms), abs=1e-12)
    assert atoms.info["e3relax_fmax_cell"] < 0.05


def test_max_steps_reported_as_not_converged(relaxer, caplog):
    atoms = strained("Cu", strain=1.06)
    with caplog.at_level(logging.WARNING, logger="e3relax_ase.relax.refine"):
        relaxed = relaxer.relax(atoms, refine=EMT(), fmax=0.001, steps=3)
    assert relaxed.info["e3relax_converged"] is False
    assert relaxed.info["e3relax_nsteps"] == 3
    measured = generalised_fmax(relaxed)
    assert measured > 0.001
    assert relaxed.info["e3relax_fmax"] == pytest.approx(measured, abs=1e-9)
    assert "after 3 of 3 steps" in caplog.text and "(not converged)" in caplog.text


def test_fixed_atom_does_not_move_and_magmoms_survive(relaxer):
    atoms = strained("Ni")
    atoms.set_constraint(FixAtoms(indices=[0]))
    atoms.set_initial_magnetic_moments([0.6, 0.6, 0.7, 0.7])
    relaxed = relaxer.relax(atoms, relax_cell=False, refine=EMT(), fmax=0.05)
    assert relaxed.info["e3relax_converged"] is True
    assert np.array_equal(relaxed.positions[0], atoms.positions[0])
    assert np.abs(relaxed.positions[1:] - atoms.positions[1:]).max() > 1e-3
    assert np.array_equal(relaxed.get_initial_magnetic_moments(), [0.6, 0.6, 0.7, 0.7])
    assert np.array_equal(relaxed.cell.array, atoms.cell.array)


def test_slab_refinement_keeps_vacuum_axis(relaxer):
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    slab.set_constraint(FixAtoms(indices=list(range(4))))
    slab.rattle(0.03, seed=4)
    relaxed = relaxer.relax(slab, refine="emt", fmax=0.05, steps=300)
    assert relaxed.info["e3relax_converged"] is True
    assert np.array_equal(relaxed.cell.array[2], slab.cell.array[2])
    assert list(relaxed.pbc) == [True, True, False]


def test_pressure_shrinks_the_cell(relaxer):
    atoms = strained("Cu", strain=1.0)
    free = relaxer.relax(atoms, refine=EMT(), fmax=0.01)
    pressed = relaxer.relax(atoms, refine=EMT(), fmax=0.01, scalar_pressure=10 * GPa)
    assert pressed.info["e3relax_converged"] and free.info["e3relax_converged"]
    assert pressed.get_volume() < free.get_volume() * 0.99


def test_refinement_trajectory_opens_in_ase(relaxer, tmp_path):
    path = tmp_path / "refine.traj"
    relaxed = relaxer.relax(strained("Au"), refine=EMT(), trajectory=str(path), optimizer="BFGS", cell_filter="UnitCellFilter")
    frames = ase.io.read(path, ":")
    assert len(frames) == relaxed.info["e3relax_nsteps"] + 1
    assert np.allclose(frames[-1].positions, relaxed.positions)


def test_refine_function_positions_only():
    atoms = strained("Pt")
    cell = atoms.cell.array.copy()
    result = refine(atoms, EMT, relax_cell=False, fmax=0.05)  # a calculator class is accepted too
    assert result.converged and np.array_equal(atoms.cell.array, cell)
    assert atoms.info["e3relax_nsteps"] == result.nsteps


def test_names_are_resolved():
    assert type(make_calculator("emt")).__name__ == "EMT"
    assert optimizer_class("BFGS") is BFGS
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_class("Newton")
    with pytest.raises(ValueError, match="unknown calculator"):
        make_calculator("nonsense")


class RecordingEMT(EMT):
    """EMT that remembers the positions and cell of every energy/force evaluation."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        self.seen.append((atoms.positions.copy(), atoms.cell.array.copy()))
        super().calculate(atoms, properties, system_changes)


@pytest.mark.parametrize("runner", ["run", "irun"])
def test_oneshot_then_optimize_jumps_before_first_force_call(relaxer, runner):
    atoms = strained("Cu", strain=1.04)
    prediction = relaxer.relax(atoms)
    atoms.calc = RecordingEMT()
    optimizer = OneShotThenOptimize(FrechetCellFilter(atoms), optimizer="FIRE", relaxer=relaxer, logfile=None)
    if runner == "run":
        converged = optimizer.run(fmax=0.05, steps=300)
    else:
        converged = False
        for converged in optimizer.irun(fmax=0.05, steps=300):  # noqa: B007 (the last verdict is kept)
            pass
    assert converged
    first_positions, first_cell = atoms.calc.seen[0]
    assert np.allclose(first_positions, prediction.positions, atol=1e-12)
    assert np.allclose(first_cell, prediction.cell.array, atol=1e-12)
    assert atoms.info["e3relax_nsteps"] == optimizer.nsteps
    assert atoms.info["e3relax_converged"] is (generalised_fmax(atoms) < 0.05)  # judged afresh
    assert atoms.info["e3relax_fmax"] == pytest.approx(generalised_fmax(atoms), abs=1e-9)


def test_oneshot_then_optimize_on_bare_atoms_keeps_cell(relaxer):
    atoms = strained("Ag")
    cell = atoms.cell.array.copy()
    atoms.calc = EMT()
    assert OneShotThenOptimize(atoms, optimizer=BFGS, relaxer=relaxer, logfile=None).run(fmax=0.05)
    assert np.array_equal(atoms.cell.array, cell)
    assert atoms.info["e3relax_relax_cell"] is False
