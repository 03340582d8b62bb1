"""OneShotRelaxer: applying predictions, properties kept, options, sanity, batching, determinism."""

import logging

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms, FixCartesian
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

import e3relax_ase
import e3relax_ase.relax.runner as runner_module
from e3relax_ase.geometry.validation import InvalidStructureError
from e3relax_ase.io.structures import spacegroup_number
from e3relax_ase.relax.predict import Prediction, ReadyPredictions
from e3relax_ase.relax.relaxer import OneShotRelaxer, PredictionError, RelaxFailure
from e3relax_ase.relax.sanity import REFINE_ADVISED_CORRECTION, check_prediction, confidence
from e3relax_ase.testing import tiny_model

REAL_PREDICT = runner_module.predict


@pytest.fixture(scope="module")
def relaxer():
    return OneShotRelaxer(tiny_model(), device="cpu")


def rattled(atoms, seed=0, amount=0.05):
    atoms = atoms.copy()
    atoms.rattle(amount, seed=seed)
    return atoms


def nacl():
    return rattled(bulk("NaCl", "rocksalt", a=5.64, cubic=True))


def slab_with_extras():
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.set_initial_magnetic_moments(np.linspace(0.1, 1.2, len(slab)))
    slab.set_initial_charges(np.full(len(slab), 0.1))
    slab.set_tags(np.arange(len(slab)))
    slab.info["user_key"] = "kept"
    return rattled(slab, seed=1, amount=0.03)


def patch_predict(monkeypatch, change):
    """Replace the network's output: ``change(prediction, crystal)`` edits it in place."""

    def fake(model, crystals, *args, wait=True, **kwargs):
        predictions = REAL_PREDICT(model, crystals, *args, **kwargs)
        for prediction, crystal in zip(predictions, crystals):
            change(prediction, crystal)
        return predictions if wait else ReadyPredictions(predictions)

    monkeypatch.setattr(runner_module, "predict", fake)


# --- what relax returns ---------------------------------------------------------------------


def test_relax_returns_new_atoms_with_provenance(relaxer):
    atoms = nacl()
    before = atoms.copy()
    relaxed = relaxer.relax(atoms)
    assert relaxed is not atoms
    assert np.array_equal(atoms.positions, before.positions) and np.array_equal(atoms.cell, before.cell)
    assert atoms.info == before.info
    assert np.abs(relaxed.positions - atoms.positions).max() > 1e-3
    info = relaxed.info
    assert info["e3relax_model"] == "in-memory"
    assert len(info["e3relax_checkpoint_sha256"]) == 64
    assert info["e3relax_version"] == e3relax_ase.__version__
    assert info["e3relax_sane"] is True and info["e3relax_problems"] == ""
    assert info["e3relax_max_displacement"] > 0
    assert "e3relax_converged" not in info  # no force test ran


def test_inplace_mutates_the_given_atoms(relaxer):
    atoms = nacl()
    start = atoms.positions.copy()
    assert relaxer.relax(atoms, inplace=True) is atoms
    assert not np.array_equal(atoms.positions, start)


def test_stale_provenance_is_cleared(relaxer):
    atoms = nacl()
    atoms.info.update(e3relax_converged=True, e3relax_nsteps=3, user="x")
    relaxed = relaxer.relax(atoms)
    assert "e3relax_converged" not in relaxed.info and "e3relax_nsteps" not in relaxed.info
    assert relaxed.info["user"] == "x"


def test_properties_survive(relaxer):
    slab = slab_with_extras()
    relaxed = relaxer.relax(slab)
    assert np.array_equal(relaxed.get_initial_magnetic_moments(), slab.get_initial_magnetic_moments())
    assert np.array_equal(relaxed.get_initial_charges(), slab.get_initial_charges())
    assert np.array_equal(relaxed.get_tags(), slab.get_tags())
    assert relaxed.info["user_key"] == "kept"
    assert list(relaxed.pbc) == [True, True, False]
    assert [type(c).__name__ for c in relaxed.constraints] == ["FixAtoms"]


def test_fixatoms_does_not_move_with_fixed_cell(relaxer):
    slab = slab_with_extras()
    relaxed = relaxer.relax(slab, relax_cell=False)
    assert np.array_equal(relaxed.positions[[0, 1]], slab.positions[[0, 1]])
    # the free atoms move (a random network moves a nearly ideal slab's atoms by ~1e-5 Å)
    assert np.abs(relaxed.positions[2:] - slab.positions[2:]).max() > 1e-6
    assert np.array_equal(relaxed.cell.array, slab.cell.array)


def test_fixatoms_keeps_fractional_coordinates_with_cell(relaxer):
    atoms = nacl()
    atoms.set_constraint(FixAtoms(indices=[3]))
    relaxed = relaxer.relax(atoms)
    assert not np.allclose(relaxed.cell.array, atoms.cell.array)
    assert np.allclose(relaxed.get_scaled_positions(wrap=False)[3], atoms.get_scaled_positions(wrap=False)[3], atol=1e-12)


def test_fixcartesian_is_honoured(relaxer):
    atoms = nacl()
    atoms.set_constraint(FixCartesian(2, mask=[True, False, True]))
    relaxed = relaxer.relax(atoms, relax_cell=False)
    assert relaxed.positions[2, 0] == atoms.positions[2, 0] and relaxed.positions[2, 2] == atoms.positions[2, 2]
    assert relaxed.positions[2, 1] != atoms.positions[2, 1]


def test_vacuum_axis_never_stretched(relaxer):
    slab = slab_with_extras()
    relaxed = relaxer.relax(slab)
    assert np.array_equal(relaxed.cell.array[2], slab.cell.array[2])
    assert not np.allclose(relaxed.cell.array[:2], slab.cell.array[:2])


def test_return_trajectory_one_frame_per_layer(relaxer, tmp_path):
    atoms = nacl()
    relaxed, frames = relaxer.relax(atoms, return_trajectory=True)
    assert len(frames) == relaxer.model.config.num_layers + 1
    assert np.array_equal(frames[0].positions, atoms.positions)
    assert np.allclose(frames[-1].positions, relaxed.positions, atol=1e-12)
    assert len({round(float(np.abs(f.positions - atoms.positions).sum()), 9) for f in frames}) == len(frames)
    ase.io.write(tmp_path / "layers.traj", frames)
    assert len(ase.io.read(tmp_path / "layers.traj", ":")) == len(frames)


# --- options ----------------------------------------------------------------------------------


def test_relax_cell_false_places_fractional_coordinates_in_input_cell(relaxer):
    atoms = nacl()
    free = relaxer.relax(atoms)
    fixed = relaxer.relax(atoms, relax_cell=False)
    assert np.array_equal(fixed.cell.array, atoms.cell.array)
    assert np.allclose(fixed.get_scaled_positions(wrap=False), free.get_scaled_positions(wrap=False), atol=1e-10)
    assert fixed.info["e3relax_relax_cell"] is False


@pytest.mark.parametrize(
    "atoms",
    [bulk("NaCl", "rocksalt", a=5.64, cubic=True), bulk("Mg", "hcp", a=3.2, c=5.2), bulk("ZnO", "wurtzite", a=3.25, c=5.2, u=0.38)],
    ids=["rocksalt", "hcp", "wurtzite"],
)
def test_fix_symmetry_keeps_space_group(relaxer, monkeypatch, atoms):
    rng = np.random.default_rng(3)

    def break_symmetry(prediction, crystal):
        prediction.positions[-1] += rng.normal(0, 0.05, prediction.positions[-1].shape)
        # 25 % larger and sheared: beyond ASE's 0.25 FixSymmetry step, applied in steps.
        prediction.cell[-1] = prediction.cell[-1] @ (1.25 * np.eye(3) + rng.normal(0, 0.02, (3, 3)))

    patch_predict(monkeypatch, break_symmetry)
    number = spacegroup_number(atoms, 1e-3)
    assert spacegroup_number(relaxer.relax(atoms), 1e-3) != number  # the change does break it
    kept = relaxer.relax(atoms, fix_symmetry=True, symprec=1e-3)
    assert spacegroup_number(kept, 1e-5) == number
    assert kept.info["e3relax_spacegroup_input"] == kept.info["e3relax_spacegroup"] == number
    assert kept.get_volume() / atoms.get_volume() > 1.5  # the large cell change was applied
    assert kept.constraints == []  # FixSymmetry was only borrowed


def test_fix_symmetry_applies_a_halved_cell_without_ases_large_step_warning(relaxer, monkeypatch):
    """MgO predicted at half its cell: equal steps of the change grew to 0.167 of the shrunken
    cell at the end, past the 0.15 where FixSymmetry warns it "may be ill behaved"."""
    import warnings

    def halve(prediction, crystal):
        prediction.cell[-1] = crystal.cell * 0.5
        prediction.positions[-1] = crystal.positions * 0.5

    patch_predict(monkeypatch, halve)
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = relaxer.relax(atoms, fix_symmetry=True, symprec=1e-3)
    assert not [w for w in caught if "adjust_cell" in str(w.message)], [str(w.message) for w in caught]
    assert np.allclose(kept.cell.array, atoms.cell.array * 0.5, atol=1e-9)
    assert kept.info["e3relax_spacegroup"] == 225


def test_progress_counts_every_structure_failures_included(relaxer):
    class Counter:
        def __init__(self):
            self.done = 0

        def update(self, n):
            self.done += n

    counter = Counter()
    bad = nacl()
    bad.positions[1] = bad.positions[0]
    relaxer.relax_many([nacl(), bad, nacl()], errors="return", progress=counter)
    assert counter.done == 3


def test_progress_true_shows_a_bar_on_stderr(relaxer, capsys):
    relaxer.relax_many([nacl(), nacl()], progress=True)
    err = capsys.readouterr().err
    assert "relaxing" in err and "2/2" in err and "structure/s" in err


def test_pymatgen_in_pymatgen_out(relaxer):
    atoms = nacl()
    atoms.set_initial_magnetic_moments(np.arange(8) * 0.1)
    structure = AseAtomsAdaptor.get_structure(atoms)
    relaxed = relaxer.relax(structure)
    assert isinstance(relaxed, Structure)
    assert np.allclose(relaxed.site_properties["magmom"], np.arange(8) * 0.1)
    assert relaxed.properties["e3relax_sane"] is True
    assert np.allclose(relaxed.cart_coords, relaxer.relax(atoms).positions, atol=1e-8)
    mixed = relaxer.relax_many([structure, atoms, structure])
    assert [type(r).__name__ for r in mixed] == ["Structure", "Atoms", "Structure"]
    with pytest.raises(ValueError, match="inplace=True works on ASE Atoms only"):
        relaxer.relax(structure, inplace=True)
    with pytest.raises(TypeError, match="expected an ase.Atoms or a pymatgen Structure"):
        relaxer.relax("NaCl")


# --- sanity and confidence ----------------------------------------------------------------------


def test_insane_prediction_flagged_and_logged(relaxer, monkeypatch, caplog):
    def collapse(prediction, crystal):
        prediction.positions[-1][1] = prediction.positions[-1][0] + [0.1, 0.0, 0.0]

    patch_predict(monkeypatch, collapse)
    atoms = nacl()
    with caplog.at_level(logging.WARNING, logger="e3relax_ase.relax.relaxer"):
        relaxed = relaxer.relax(atoms)
    assert relaxed.info["e3relax_sane"] is False
    assert "atoms 0 and 1 are 0.100 Å apart" in relaxed.info["e3relax_problems"]
    assert relaxed.info["e3relax_refine_advised"] is True
    assert "prediction failed sanity checks" in caplog.text
    kept = relaxer.relax(atoms, on_insane="input")
    assert np.array_equal(kept.positions, atoms.positions) and kept.info["e3relax_sane"] is False
    with pytest.raises(PredictionError, match="0.100 Å apart"):
        relaxer.relax(atoms, on_insane="raise")


def test_insane_prediction_is_not_named_when_nobody_reads_the_message(relaxer, monkeypatch):
    """Naming a structure can mean building its formula: with warnings off and on_insane="warn"
    the message is not built, and the result (flags, problems) is the same."""
    import e3relax_ase.relax.items as items_module

    def collapse(prediction, crystal):
        prediction.positions[-1][1] = prediction.positions[-1][0] + [0.1, 0.0, 0.0]

    patch_predict(monkeypatch, collapse)
    named = []
    real_name_of = items_module.name_of
    monkeypatch.setattr(items_module, "name_of", lambda *args: named.append(args) or real_name_of(*args))
    logger = logging.getLogger("e3relax_ase")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        quiet = relaxer.relax_many([nacl()])[0]
    finally:
        logger.setLevel(level)
    assert not named
    assert quiet.info["e3relax_sane"] is False and "0.100 Å apart" in quiet.info["e3relax_problems"]
    relaxer.relax_many([nacl()])  # warnings on: the message names it
    assert named


def test_nan_prediction_falls_back_to_input(relaxer, monkeypatch):
    def poison(prediction, crystal):
        prediction.positions[-1][0, 0] = np.nan

    patch_predict(monkeypatch, poison)
    atoms = nacl()
    relaxed = relaxer.relax(atoms)
    assert np.array_equal(relaxed.positions, atoms.positions)
    assert relaxed.info["e3relax_problems"] == "prediction contains NaN or infinite values"


def test_check_prediction_rules():
    cell = np.eye(3) * 4.0
    positions = np.array([[0.0, 0, 0], [2.0, 2, 2]])
    pbc = np.array([True, True, True])
    assert check_prediction(positions, cell, pbc, cell).ok
    assert "volume changed by a factor 8" in check_prediction(positions * 2, cell * 2, pbc, cell).problems[0]
    flipped = check_prediction(positions, cell * np.array([[-1], [1], [1]]), pbc, cell)
    assert not flipped.ok and "det(cell) vanished or changed sign" in flipped.problems[0]
    left = cell[[1, 0, 2]]
    assert check_prediction(positions, left, pbc, left).ok  # left-handed in, left-handed out
    slab_pbc = np.array([True, True, False])
    moved = cell.copy()
    moved[2, 2] = 4.1
    assert "vacuum lattice vector 2 changed" in check_prediction(positions, moved, slab_pbc, cell).problems


def test_confidence_signal():
    cell = np.eye(3) * 5.0
    start = np.array([[0.0, 0, 0], [2.5, 2.5, 2.5]])
    settled = np.stack([start + [[0, 0, 0], [0.3, 0, 0]], start + [[0, 0, 0], [0.31, 0, 0]]])
    result = confidence(settled, np.stack([cell, cell]), start, cell)
    assert result.max_displacement == pytest.approx(0.31)
    assert result.correction_ratio == pytest.approx(0.01 / 0.31)
    assert result.last_correction == pytest.approx(0.01)
    assert not result.refine_advised
    unsettled = np.stack([start + [[0, 0, 0], [0.0, 0, 0]], start + [[0, 0, 0], [0.3, 0, 0]]])
    result = confidence(unsettled, np.stack([cell, cell]), start, cell)
    assert result.last_correction == pytest.approx(0.3)
    assert result.last_correction > REFINE_ADVISED_CORRECTION and result.refine_advised
    tiny = np.stack([start, start + [[0, 0, 0], [0.001, 0, 0]]])
    assert not confidence(tiny, np.stack([cell, cell]), start, cell).refine_advised  # nothing to refine
    strained = np.stack([cell, cell * 1.15])
    assert confidence(np.stack([start, start * 1.15]), strained, start, cell).refine_advised  # all strain in the last layer
    far = np.stack([start + [[0, 0, 0], [1.7, 0, 0]]] * 2)
    assert confidence(far, np.stack([cell, cell]), start, cell).refine_advised  # settled, but far from the input
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]])
    turned = confidence(np.stack([start, start * 1.05]) @ rotation.T, strained @ rotation.T / 1.15 * 1.05, start @ rotation.T, cell @ rotation.T)
    upright = confidence(np.stack([start, start * 1.05]), strained / 1.15 * 1.05, start, cell)
    assert turned.max_strain == pytest.approx(upright.max_strain, abs=1e-12)  # the strain measure does not see the rotation


# --- batching, failures, determinism ----------------------------------------------------------


def structures(n=5):
    base = [
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        bulk("Cu", "fcc", a=3.6),
        bulk("Si", "diamond", a=5.43),
        bulk("Mg", "hcp", a=3.2, c=5.2),
    ]
    return [rattled(base[i % len(base)], seed=i) for i in range(n)]


def test_cpu_runs_one_structure_per_pass_and_is_bitwise_batch_invariant(relaxer):
    assert relaxer.batch_size == 1 and relaxer.dtype == torch.float64
    items = structures(5)
    batch = relaxer.relax_many(items)
    again = relaxer.relax_many(items)
    for i, atoms in enumerate(items):
        alone = relaxer.relax(atoms)
        reordered = relaxer.relax_many([items[(i + 1) % 5], atoms])[1]
        for other in (batch[i], again[i], reordered):
            assert np.array_equal(other.positions, alone.positions)
            assert np.array_equal(other.cell.array, alone.cell.array)


def test_batched_passes_agree_with_single_passes(monkeypatch):
    calls = []

    def counting(model, crystals, *args, **kwargs):
        calls.append(len(crystals))
        return REAL_PREDICT(model, crystals, *args, **kwargs)

    monkeypatch.setattr(runner_module, "predict", counting)
    items = structures(6)
    reference = OneShotRelaxer(tiny_model(), device="cpu").relax_many(items)
    calls.clear()
    edges = [OneShotRelaxer(tiny_model()).validate(a).n_edges for a in items]
    budget = sum(edges[:3])  # the first three fit one pass
    batched = OneShotRelaxer(tiny_model(), device="cpu", batch_size=100, max_edges=budget).relax_many(items)
    assert calls[0] == 3 and sum(calls) == 6 and len(calls) >= 2
    for a, b in zip(reference, batched):
        assert np.allclose(a.positions, b.positions, atol=1e-10) and np.allclose(a.cell.array, b.cell.array, atol=1e-10)
    calls.clear()
    OneShotRelaxer(tiny_model(), device="cpu").relax_many(items, batch_size=4)  # per-call budget
    assert calls == [4, 2]


def test_out_of_memory_splits_the_batch(monkeypatch):
    calls = []

    def small_memory(model, crystals, *args, **kwargs):
        calls.append(len(crystals))
        if len(crystals) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return REAL_PREDICT(model, crystals, *args, **kwargs)

    monkeypatch.setattr(runner_module, "predict", small_memory)
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", batch_size=4)
    results = relaxer.relax_many(structures(4))
    assert calls[:3] == [4, 2, 1] and calls.count(1) == 4
    assert all(r.info["e3relax_sane"] for r in results)
    assert relaxer.runner.batch_edges < relaxer.max_edges  # later batches start smaller

    def no_memory(model, crystals, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")

    monkeypatch.setattr(runner_module, "predict", no_memory)
    with pytest.raises(InvalidStructureError, match="out of memory on cpu with 8 atoms"):
        relaxer.relax(nacl())


def test_relax_many_collects_failures_and_keeps_order(relaxer):
    items = structures(4)
    broken = items[2].copy()
    broken.positions[1] = broken.positions[0]
    items[2] = broken
    with pytest.raises(InvalidStructureError, match="structure 2"):
        relaxer.relax_many(items)
    results = relaxer.relax_many(iter(items), errors="return", names=["a", "b", "c", "d"])  # any iterable
    assert [type(r).__name__ for r in results] == ["Atoms", "Atoms", "RelaxFailure", "Atoms"]
    failure = results[2]
    assert isinstance(failure, RelaxFailure) and failure.index == 2 and failure.message.startswith("c: atoms 0 and 1")


def test_exception_mid_batch_is_isolated(monkeypatch):
    def fragile(model, crystals, *args, **kwargs):
        if any(14 in c.numbers for c in crystals):  # the Si cell breaks any batch it is in
            raise RuntimeError("kernel failure")
        return REAL_PREDICT(model, crystals, *args, **kwargs)

    monkeypatch.setattr(runner_module, "predict", fragile)
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", batch_size=8)
    results = relaxer.relax_many(structures(4), errors="return")
    assert [type(r).__name__ for r in results] == ["Atoms", "Atoms", "RelaxFailure", "Atoms"]
    assert "kernel failure" in results[2].message


def test_model_dtype_and_device_options():
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float32")
    assert next(relaxer.model.parameters()).dtype == torch.float32
    assert relaxer.relax(nacl()).info["e3relax_sane"]
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        OneShotRelaxer(tiny_model(), device="cpu", dtype=torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            OneShotRelaxer(tiny_model(), device="cuda")


def test_default_checkpoint(caplog):
    with caplog.at_level(logging.WARNING, logger="e3relax_ase.relax.relaxer"):
        relaxer = OneShotRelaxer()
    assert ("UNTRAINED" in caplog.text) == relaxer.info.untrained
    relaxed = relaxer.relax(nacl())
    assert relaxed.info["e3relax_model"] == relaxer.info.name
    assert relaxed.info["e3relax_checkpoint_sha256"] == relaxer.info.sha256
    assert relaxed.info["e3relax_untrained"] == relaxer.info.untrained


def test_prediction_layers_are_used(relaxer, monkeypatch):
    """The relaxer applies the LAST layer and maps nothing itself (predict does)."""
    seen = {}

    def fake(model, crystals, *args, wait=True, **kwargs):
        crystal = crystals[0]
        layers = np.stack([crystal.positions + 0.01, crystal.positions + 0.02])
        cells = np.stack([crystal.cell, crystal.cell * 1.01])
        seen["cell"] = cells[-1]
        return [Prediction(layers, cells)] if wait else ReadyPredictions([Prediction(layers, cells)])

    monkeypatch.setattr(runner_module, "predict", fake)
    atoms = nacl()
    relaxed = relaxer.relax(atoms)
    assert np.array_equal(relaxed.cell.array, seen["cell"])
    assert np.allclose(relaxed.positions, atoms.positions + 0.02, atol=1e-12)


def test_grouped_options_give_what_the_flat_keywords_give(tmp_path):
    """RefineOptions and BatchBudget (relax_many's grouped arguments) against the former flat
    keywords, which stay accepted: the same structures, bitwise."""
    from ase.calculators.emt import EMT

    from e3relax_ase import BatchBudget, RefineOptions

    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64")
    structures = [bulk("Cu", "fcc", a=3.7), bulk("Al", "fcc", a=4.1, cubic=True)]
    flat = relaxer.relax_many(structures, refine=EMT, fmax=0.2, steps=7, batch_size=1, max_edges=10_000)
    grouped = relaxer.relax_many(structures, refine=RefineOptions(EMT, fmax=0.2, steps=7), budget=BatchBudget(batch_size=1, max_edges=10_000))
    fewer = relaxer.relax_many(structures, refine=RefineOptions(EMT, fmax=0.2, steps=2))
    for a, b in zip(flat, grouped):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell.array, b.cell.array)
        assert a.info["e3relax_nsteps"] == b.info["e3relax_nsteps"] <= 7
    assert all(c.info["e3relax_nsteps"] <= 2 for c in fewer) and any(a.info["e3relax_nsteps"] > 2 for a in flat)  # steps took effect
    overridden = relaxer.relax_many(structures[:1], refine=RefineOptions(EMT, fmax=0.2, steps=50), steps=7)
    assert overridden[0].info["e3relax_nsteps"] == flat[0].info["e3relax_nsteps"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'fmx'"):
        relaxer.relax_many(structures, refine=EMT, fmx=0.1)
