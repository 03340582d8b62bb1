"""Vacuum along periodic axes: slabs built periodic, molecules in a periodic box (e3relax_ase.geometry.vacuum)."""

import logging

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT

from e3relax_ase.geometry.vacuum import find_vacuum
from e3relax_ase.geometry.validation import InvalidStructureError
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def relaxer():
    return OneShotRelaxer(tiny_model(), device="cpu")


def periodic_slab(shift=0.0):
    """A Cu(111) slab with 12 Å of vacuum, built with periodic=True (pbc all True); ``shift``
    (fractional, along c) puts it across the cell boundary."""
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0, periodic=True)
    slab.rattle(0.02, seed=3)
    slab.positions += shift * slab.cell.array[2]
    slab.wrap()
    return slab


def water_in_a_box():
    water = molecule("H2O")
    water.set_cell([10.0, 10.0, 10.0])
    water.center()
    water.pbc = True
    return water


def test_find_vacuum_sees_slabs_and_clusters_not_bulk():
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((1, 1, 3))
    assert find_vacuum(crystal.positions, crystal.cell.array, crystal.pbc, 6.0) is None
    layout = find_vacuum(periodic_slab().positions, periodic_slab().cell.array, [True] * 3, 6.0)
    assert layout.axes == (2,) and not layout.cluster and layout.gaps[0] == pytest.approx(12.0, abs=0.2)
    water = water_in_a_box()
    layout = find_vacuum(water.positions, water.cell.array, water.pbc, 6.0)
    assert layout.axes == (0, 1, 2) and layout.cluster


@pytest.mark.parametrize("shift", [0.0, 0.45], ids=["inside", "across-the-boundary"])
def test_vacuum_along_a_periodic_axis_keeps_that_lattice_vector(relaxer, caplog, shift):
    slab = periodic_slab(shift)
    with caplog.at_level(logging.WARNING, logger="e3relax_ase.relax.relaxer"):
        relaxed = relaxer.relax(slab)
    assert np.array_equal(relaxed.cell.array[2], slab.cell.array[2])  # the vacuum vector, untouched
    assert not np.allclose(relaxed.cell.array[:2], slab.cell.array[:2])  # the in-plane ones relax
    assert relaxed.info["e3relax_vacuum_axes"] == "c" and list(relaxed.pbc) == [True, True, True]
    assert "vacuum of 12.0 Å along axis 2" in caplog.text and "kept as given" in caplog.text
    # The atoms stay where the caller had them (same periodic images), not a lattice vector away.
    assert np.abs(relaxed.positions - slab.positions).max() < 1.0
    assert relaxed.info["e3relax_sane"] is True


def test_bulk_crystal_gets_no_vacuum_record(relaxer):
    relaxed = relaxer.relax(bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    assert "e3relax_vacuum_axes" not in relaxed.info


def test_molecule_in_a_periodic_box_is_refused_unless_allowed(relaxer, caplog):
    water = water_in_a_box()
    with pytest.raises(
        InvalidStructureError, match=r"H2O: an isolated cluster or molecule in a periodic box \(vacuum of 10\.0 Å along axis 0, 8\.5 Å along axis 1"
    ):
        relaxer.relax(water)
    with caplog.at_level(logging.WARNING, logger="e3relax_ase.relax.relaxer"):
        kept = relaxer.relax(water, allow_cluster=True)
    assert np.array_equal(kept.cell.array, water.cell.array)  # its box kept
    assert kept.info["e3relax_cluster"] is True and kept.info["e3relax_relax_cell"] is False
    assert "relaxed keeping its box" in caplog.text


def test_worker_processes_see_the_same_vacuum(relaxer):
    structures = [periodic_slab(0.45), water_in_a_box(), bulk("Cu", "fcc", a=3.7, cubic=True)]
    here = relaxer.relax_many(structures, errors="return")
    pooled = relaxer.relax_many(structures, errors="return", num_workers=1)
    relaxer.close()
    assert "isolated cluster" in here[1].message and "isolated cluster" in pooled[1].message
    for a, b in ((here[0], pooled[0]), (here[2], pooled[2])):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell.array, b.cell.array)
        assert a.info == b.info


def test_refinement_keeps_the_vacuum_vector_too(relaxer):
    slab = periodic_slab()
    refined = relaxer.relax(slab, refine=EMT(), fmax=0.1, steps=100)
    assert np.array_equal(refined.cell.array[2], slab.cell.array[2])
