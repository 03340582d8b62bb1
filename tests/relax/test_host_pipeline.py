"""The main process's shortcuts in relax_many compute exactly what the straightforward code did.

``copy_atoms`` against ``Atoms.copy``, ``restore_all`` against ``CanonicalForm.restore`` per
crystal, and ``relax_many`` (sequential and with workers) against a reference written the
plain way: ``predict`` from scratch, ``Atoms.copy``, ``apply_prediction`` and the provenance
keys written one by one.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms, FixCartesian

from e3relax_ase.geometry.canonical import canonicalize
from e3relax_ase.io.structures import _light_copy_matches, copy_atoms
from e3relax_ase.relax.predict import restore_all


def _atoms_variety():
    plain = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.set_constraint([FixAtoms(indices=[0, 1]), FixCartesian(2, mask=(1, 0, 0))])
    slab.set_initial_magnetic_moments(np.linspace(0.1, 1.2, len(slab)))
    slab.info.update({"name": "slab", "energy": -3.5, "tags": [1, 2]})
    slab.set_celldisp([0.5, 0.0, -1.0])
    with_calc = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    with_calc.calc = EMT()
    with_calc.set_momenta(np.ones((len(with_calc), 3)))
    mixed_pbc = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], cell=[5, 6, 7], pbc=[True, False, True])
    empty = Atoms(cell=np.eye(3) * 2, pbc=True)
    return [plain, slab, with_calc, mixed_pbc, empty]


def _state(atoms) -> list:
    """Everything an Atoms holds, comparable: attribute names in order, types, values."""
    out = []
    for key, value in vars(atoms).items():
        if key == "_cellobj":
            value = (value.array.dtype, value.array.tobytes())
        elif isinstance(value, np.ndarray):
            value = (value.dtype, value.shape, value.tobytes())
        elif key == "arrays":
            value = [(k, v.dtype, v.shape, v.tobytes()) for k, v in value.items()]
        elif key == "_constraints":
            value = [(type(c), c.todict()) for c in value]
        out.append((key, type(vars(atoms)[key]), value))
    return out


@pytest.mark.parametrize("index", range(5))
def test_copy_atoms_is_atoms_copy(index):
    assert _light_copy_matches()
    atoms = _atoms_variety()[index]
    reference, light = atoms.copy(), copy_atoms(atoms)
    assert _state(light) == _state(reference)
    assert light.calc is None and light == reference
    # Independent of the original, as copy() is.
    for name in light.arrays:
        assert not np.shares_memory(light.arrays[name], atoms.arrays[name])
    assert not np.shares_memory(light.cell.array, atoms.cell.array) and not np.shares_memory(light.pbc, atoms.pbc)
    assert light.info is not atoms.info and light.constraints is not atoms.constraints
    assert all(a is not b for a, b in zip(light.constraints, atoms.constraints))
    assert pickle.loads(pickle.dumps(light)) == reference


def test_copy_atoms_of_a_subclass_is_its_copy():
    class Tagged(Atoms):
        pass

    atoms = Tagged("H2", positions=[[0, 0, 0], [0.7, 0, 0]], cell=[5, 6, 7], pbc=True)
    copied = copy_atoms(atoms)
    assert type(copied) is Tagged and copied == atoms


def _forms(rng, n_crystals):
    """Canonical forms of random skewed crystals, some with atoms outside the cell (image shifts)."""
    forms, sizes = [], []
    for k in range(n_crystals):
        n = int(rng.integers(1, 9))
        cell = np.eye(3) * 4 + rng.uniform(-1.5, 1.5, (3, 3))
        fractional = rng.uniform(0, 1, (n, 3))
        if k % 3 == 0:
            fractional += rng.integers(-2, 3, (n, 3))
        pbc = np.array([True, True, k % 5 != 0])
        forms.append(canonicalize(fractional @ cell, cell, pbc))
        sizes.append(n)
    return forms, np.concatenate([[0], np.cumsum(sizes)]).tolist()


def test_restore_all_is_restore_per_crystal_bit_for_bit():
    rng = np.random.default_rng(3)
    forms, bounds = _forms(rng, 60)
    assert any(f.image_shift.any() for f in forms) and any(not f.image_shift.any() for f in forms)
    assert any((f.transform != np.eye(3)).any() for f in forms)
    n_layers = 3
    positions = rng.normal(0, 3, (n_layers, bounds[-1], 3))
    cells = rng.normal(0, 3, (n_layers, len(forms), 3, 3))
    # The awkward values: exact zeros of both signs (x + 0 * cell would turn -0.0 into 0.0), a
    # NaN / an infinite cell (0 * inf is NaN), NaN positions, and a shifted crystal with a zero.
    unshifted = [k for k, f in enumerate(forms) if not f.image_shift.any()]
    shifted = [k for k, f in enumerate(forms) if f.image_shift.any()]
    positions[:, bounds[unshifted[0]]] = 0.0
    positions[1, bounds[unshifted[1]], 2] = -0.0
    positions[2, bounds[unshifted[2]]] = np.nan
    cells[0, unshifted[3], 1, 2] = np.nan
    cells[2, unshifted[4], 0, 0] = np.inf
    cells[:, unshifted[5], :, 0] = -np.abs(cells[:, unshifted[5], :, 0])  # zero products are -0.0
    positions[0, bounds[unshifted[5]], 0] = -0.0
    positions[0, bounds[shifted[0]], 1] = -0.0
    with np.errstate(invalid="ignore"):
        restored = restore_all(forms, positions, cells, bounds)
        for index, form in enumerate(forms):
            expected_positions, expected_cell = form.restore(positions[:, bounds[index] : bounds[index + 1]], cells[:, index])
            got = restored[index]
            assert got.positions.tobytes() == expected_positions.tobytes(), index
            assert got.cell.tobytes() == expected_cell.tobytes(), index
            assert got.positions.flags.c_contiguous and got.cell.flags.c_contiguous
            assert got.positions.shape == expected_positions.shape and got.cell.shape == expected_cell.shape


def test_narrowed_worker_outcomes_give_the_same_graph_and_restore():
    """Workers send edges and image shifts in the narrowest integer type; what the main process
    builds from them is what it builds from the int64 originals."""
    import torch

    from e3relax_ase.geometry.graph import graph_from_edges
    from e3relax_ase.relax.pool_prepare import _narrowest

    rng = np.random.default_rng(5)
    forms, bounds = _forms(rng, 12)
    edges = []
    for k, form in enumerate(forms):
        n = len(form.positions)
        count = int(rng.integers(0, 40))
        edges.append((rng.integers(0, n, count), rng.integers(0, n, count), rng.integers(-200 if k == 3 else -2, 3, (count, 3))))
    assert _narrowest(edges[3][2]).dtype == np.int16 and _narrowest(edges[0][0]).dtype == np.int8
    assert _narrowest(np.array([2**40])).dtype == np.int64 and _narrowest(np.zeros(0, np.int64)).dtype == np.int64
    narrowed = [tuple(_narrowest(a) for a in e) for e in edges]
    numbers = [np.full(len(f.positions), 14) for f in forms]
    pbcs = [np.ones(3, bool)] * len(forms)
    for dtype in (torch.float32, torch.float64):
        wide = graph_from_edges(numbers, [f.positions for f in forms], [f.cell for f in forms], pbcs, edges, dtype)
        narrow = graph_from_edges(numbers, [f.positions for f in forms], [f.cell for f in forms], pbcs, narrowed, dtype)
        for name in ("edge_src", "edge_dst", "edge_shift", "positions", "batch"):
            a, b = getattr(wide, name), getattr(narrow, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    positions = rng.normal(0, 3, (2, bounds[-1], 3))
    cells = rng.normal(0, 3, (2, len(forms), 3, 3))
    for k, form in enumerate(forms):
        narrow_form = type(form)(form.positions, form.cell, form.transform, _narrowest(form.image_shift))
        p, c = form.restore(positions[:, bounds[k] : bounds[k + 1]], cells[:, k])
        q, d = narrow_form.restore(positions[:, bounds[k] : bounds[k + 1]], cells[:, k])
        assert p.tobytes() == q.tobytes() and c.tobytes() == d.tobytes()


def _reference_relax_many(relaxer, structures, relax_cell, chunk):
    """relax_many written the plain way: predict from scratch per chunk, Atoms.copy,
    apply_prediction, the sanity checks here, every provenance key written one by one."""
    import os

    from e3relax_ase import __version__
    from e3relax_ase.geometry.vacuum import find_vacuum
    from e3relax_ase.io.structures import apply_prediction, clear_provenance, crystal_arrays
    from e3relax_ase.relax.predict import CrystalArrays, predict
    from e3relax_ase.relax.sanity_batch import judge_batch

    out = []
    for start in range(0, len(structures), chunk):
        batch = structures[start : start + chunk]
        crystals = [crystal_arrays(a) for a in batch]
        # Vacuum along a periodic axis: that axis is non-periodic for the network (e3relax_ase/geometry/vacuum.py).
        layouts = [find_vacuum(c.positions, c.cell, c.pbc, relaxer.model.config.cutoff) for c in crystals]
        crystals = [c if v is None else CrystalArrays(c.numbers, v.positions, c.cell, v.pbc) for c, v in zip(crystals, layouts)]
        predictions = predict(relaxer.model, crystals, "cpu", relaxer.dtype)
        for atoms, crystal, prediction, layout in zip(batch, crystals, predictions, layouts):
            closest = min(relaxer.validate(atoms).min_distance, relaxer.model.config.cutoff)
            # Judged alone: a structure's verdict does not depend on its batch (test_sanity_batch.py).
            ((sanity, signal),) = judge_batch(
                prediction.positions,
                prediction.cell[:, None],
                crystal.positions,
                crystal.cell[None],
                crystal.pbc[None],
                [closest],
                [len(crystal.positions)],
                relax_cell,
                relaxer.min_distance,
            )
            expected = atoms.copy()
            clear_provenance(expected)
            if sanity.ok or "NaN" not in " ".join(sanity.problems):
                shift = layout.translation if layout is not None else 0.0
                apply_prediction(expected, prediction.positions[-1] - shift, prediction.cell[-1], relax_cell)
            info = expected.info
            info["e3relax_model"] = relaxer.info.name or os.path.basename(relaxer.info.path)
            info["e3relax_checkpoint_sha256"] = relaxer.info.sha256
            info["e3relax_version"] = __version__
            info["e3relax_untrained"] = bool(relaxer.info.untrained)
            info["e3relax_relax_cell"] = bool(relax_cell)
            info["e3relax_max_displacement"] = signal.max_displacement
            info["e3relax_max_strain"] = signal.max_strain
            info["e3relax_sane"] = bool(sanity.ok)
            info["e3relax_problems"] = "; ".join(sanity.problems)
            info["e3relax_correction_ratio"] = signal.correction_ratio
            info["e3relax_last_correction"] = signal.last_correction
            info["e3relax_refine_advised"] = bool(signal.refine_advised or not sanity.ok)
            if layout is not None:
                info["e3relax_vacuum_axes"] = ",".join("abc"[axis] for axis in layout.axes)
            out.append(expected)
    return out


@pytest.mark.parametrize("relax_cell", [True, False])
def test_relax_many_is_the_plain_reference(relax_cell):
    from e3relax_ase.relax.relaxer import OneShotRelaxer
    from e3relax_ase.testing import random_crystal, tiny_model

    rng = np.random.default_rng(11)
    structures = []
    for k in range(14):
        crystal = random_crystal(rng, n_atoms=int(rng.integers(1, 7)), skew=0.5)
        atoms = Atoms(crystal.numbers, positions=crystal.positions, cell=crystal.cell, pbc=True)
        atoms.info.update({"name": f"c{k}", "e3relax_sane": "stale", "e3relax_converged": True} if k % 3 == 0 else {"id": k})
        if k % 4 == 1:
            atoms.positions += 3.0 * atoms.cell.array[0]  # outside the cell: nonzero image shifts
        structures.append(atoms)
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.rattle(0.03, seed=1)
    structures.insert(5, slab)
    before = [(a.positions.copy(), a.cell.array.copy(), dict(a.info)) for a in structures]
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=4)
    expected = _reference_relax_many(relaxer, structures, relax_cell, 4)
    try:
        for options in ({}, {"num_workers": 2}):
            results = relaxer.relax_many(structures, relax_cell=relax_cell, **options)
            for got, want in zip(results, expected):
                assert got.positions.tobytes() == want.positions.tobytes()
                assert got.cell.array.tobytes() == want.cell.array.tobytes()
                assert list(got.info) == list(want.info) and repr(got.info) == repr(want.info)
                assert _state(got) == _state(want)
    finally:
        relaxer.close()
    for atoms, (positions, cell, info) in zip(structures, before):  # the inputs are untouched
        assert np.array_equal(atoms.positions, positions) and np.array_equal(atoms.cell.array, cell) and atoms.info == info


def test_shell_arrays_are_crystal_arrays():
    """``_shell`` builds the item's arrays from what it already read: those of crystal_arrays."""
    from e3relax_ase.io.structures import crystal_arrays
    from e3relax_ase.relax import prepare
    from e3relax_ase.relax.relaxer import OneShotRelaxer
    from e3relax_ase.testing import tiny_model

    relaxer = OneShotRelaxer(tiny_model(), device="cpu")
    transposed = bulk("Si", "diamond", a=5.43)
    transposed.arrays["positions"] = np.asfortranarray(transposed.arrays["positions"])
    for atoms in _atoms_variety()[:4] + [transposed]:
        shell, spec = prepare.shell(0, atoms, None, False, False, "return", relaxer.preparation_settings())
        expected = crystal_arrays(atoms)
        for name in ("numbers", "positions", "cell", "pbc"):
            got, want = getattr(shell.arrays, name), getattr(expected, name)
            assert got.dtype == want.dtype and got.shape == want.shape and got.strides == want.strides and got.tobytes() == want.tobytes()
            assert not np.shares_memory(got, getattr(atoms, name) if name != "cell" else atoms.cell.array)
        assert spec.numbers is shell.arrays.numbers and spec.positions is shell.arrays.positions
