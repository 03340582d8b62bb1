"""Batched FIRE + Frechet cell filter against ASE's FIRE(FrechetCellFilter), with EMT as teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

from e3relax_ase.relax.threads import single_threaded_blas
from e3relax_ase.training.distill.batched_relax import relax_all, relax_stream
from e3relax_ase.training.distill.batched_results import FireParams, RelaxInput, TeacherOutput, check_sane, min_interatomic_distance
from e3relax_ase.training.distill.frechet import expm_frechet_adjoint
from e3relax_ase.training.distill.teacher_sevennet import periodic_edges


class EMTTeacher:
    """ASE EMT behind the batched teacher interface (one EMT call per crystal)."""

    def __init__(self, nan_for: set[int] = frozenset()):
        self.nan_for = nan_for  # atomic numbers whose crystals get a NaN energy

    def __call__(self, positions, cell, numbers, batch, n_atoms) -> TeacherOutput:
        offsets = np.concatenate([[0], np.cumsum(n_atoms.cpu().numpy())])
        pos, cells, z = positions.cpu().numpy(), cell.cpu().numpy(), numbers.cpu().numpy()
        energies, forces, stresses = [], [], []
        for k in range(len(offsets) - 1):
            s = slice(offsets[k], offsets[k + 1])
            atoms = Atoms(numbers=z[s], positions=pos[s], cell=cells[k], pbc=True)
            atoms.calc = EMT()
            e = atoms.get_potential_energy()
            energies.append(np.nan if set(z[s]) & self.nan_for else e)
            forces.append(atoms.get_forces())
            stresses.append(atoms.get_stress(voigt=False))

        def t(x):
            return torch.as_tensor(np.asarray(x), dtype=positions.dtype, device=positions.device)

        return TeacherOutput(t(energies), t(np.concatenate(forces)), t(np.stack(stresses)))


def _strained_rattled(symbol: str, a: float, rng: np.random.Generator, reps=(2, 1, 1)) -> Atoms:
    atoms = bulk(symbol, "fcc", a=a, cubic=True) * reps
    eps = rng.uniform(-0.04, 0.04, (3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    return atoms


@pytest.fixture(scope="module")
def crystals() -> list[Atoms]:
    rng = np.random.default_rng(7)
    return [
        _strained_rattled("Cu", 3.70, rng),
        _strained_rattled("Al", 4.00, rng),
        _strained_rattled("Ni", 3.45, rng),
        _strained_rattled("Cu", 3.55, rng, reps=(1, 1, 1)),
    ]


def _inputs(crystals):
    return [RelaxInput(a.numbers, a.positions, a.cell.array, key=i) for i, a in enumerate(crystals)]


def _ase_relax(atoms: Atoms, fmax: float, steps: int):
    atoms = atoms.copy()
    atoms.calc = EMT()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    with single_threaded_blas():
        converged = opt.run(fmax=fmax, steps=steps)
    return atoms, bool(converged), opt.nsteps


def test_matches_ase_fire_frechet(crystals):
    results = relax_all(_inputs(crystals), EMTTeacher(), FireParams(fmax=0.02, max_steps=300), max_atoms=20)
    for atoms, result in zip(crystals, results):
        ref, converged, n_steps = _ase_relax(atoms, 0.02, 300)
        assert converged and result.converged and result.status == "converged"
        assert result.n_steps == n_steps
        np.testing.assert_allclose(result.positions, ref.positions, atol=1e-7)
        np.testing.assert_allclose(result.cell, ref.cell.array, atol=1e-7)
        assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        assert result.fmax < 0.02


def test_batch_invariance(crystals):
    """Same results whether crystals share a batch or stream through a batch of one."""
    params = FireParams(fmax=0.05, max_steps=200)
    together = relax_all(_inputs(crystals), EMTTeacher(), params, max_atoms=1000)
    alone = relax_all(_inputs(crystals), EMTTeacher(), params, max_atoms=1)
    for a, b in zip(together, alone):
        assert a.n_steps == b.n_steps
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
        np.testing.assert_allclose(a.cell, b.cell, atol=1e-10)


def test_honest_flags_when_out_of_steps(crystals):
    results = relax_all(_inputs(crystals[:2]), EMTTeacher(), FireParams(fmax=0.001, max_steps=3))
    for atoms, r in zip(crystals[:2], results):
        _, converged, n_steps = _ase_relax(atoms, 0.001, 3)
        assert not converged and n_steps == 3
        assert r.status == "max_steps" and not r.converged and r.n_steps == 3
        assert r.fmax >= 0.001


def test_already_relaxed_takes_no_step():
    atoms = bulk("Cu", "fcc", a=3.59, cubic=True)  # EMT's Cu lattice constant, no stress to speak of
    (r,) = relax_all([RelaxInput(atoms.numbers, atoms.positions, atoms.cell.array)], EMTTeacher(), FireParams(fmax=0.1))
    assert r.converged and r.n_steps == 0
    np.testing.assert_allclose(r.positions, atoms.positions)


def test_nonfinite_crystal_is_dropped_others_continue(crystals):
    results = relax_all(_inputs(crystals[:3]), EMTTeacher(nan_for={13}), FireParams(fmax=0.05))
    statuses = [r.status for r in results]
    assert statuses[1] == "nonfinite" and not results[1].converged  # the Al crystal
    assert statuses[0] == statuses[2] == "converged"


def test_fresh_check_holds_when_asked(crystals):
    results = relax_all(_inputs(crystals), EMTTeacher(), FireParams(fmax=0.02, fresh_check=True))
    for r in results:
        assert r.converged and r.fmax < 0.02 and r.fmax_fresh < 0.02


def test_stop_abandons_batch(crystals):
    calls = []

    def teacher(*args):
        calls.append(1)
        return EMTTeacher()(*args)

    results = list(relax_stream(_inputs(crystals), teacher, FireParams(fmax=1e-6), stop=lambda: len(calls) >= 4))
    assert results == [] and len(calls) == 4


def test_expm_frechet_adjoint_matches_scipy():
    from scipy.linalg import expm_frechet

    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.1, (3, 3))
    u = rng.normal(0.0, 1.0, (3, 3))
    expected = np.zeros((3, 3))
    for m in range(3):
        for n in range(3):
            e = np.zeros((3, 3))
            e[m, n] = 1.0
            expected[m, n] = np.sum(expm_frechet(a, e, compute_expm=False) * u)
    got = expm_frechet_adjoint(torch.tensor(a)[None], torch.tensor(u)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_periodic_edges_match_ase_neighbor_list():
    from ase.neighborlist import neighbor_list

    rng = np.random.default_rng(3)
    crystals = []
    for n, length in [(3, 3.1), (5, 4.0), (8, 6.5)]:
        cell = np.eye(3) * length + rng.normal(0.0, 0.6, (3, 3))  # skewed
        frac = rng.uniform(-0.7, 1.8, (n, 3))  # atoms outside the cell too
        crystals.append(Atoms(numbers=[14] * n, scaled_positions=None, positions=frac @ cell, cell=cell, pbc=True))
    positions = torch.tensor(np.concatenate([a.positions for a in crystals]))
    cells = torch.tensor(np.stack([a.cell.array for a in crystals]))
    n_atoms = torch.tensor([len(a) for a in crystals])
    batch = torch.repeat_interleave(torch.arange(len(crystals)), n_atoms)
    src, dst, vec, too_large = periodic_edges(positions, cells, batch, n_atoms, 4.0, max_candidates=500)
    assert not too_large.any()
    offsets = np.concatenate([[0], np.cumsum(n_atoms.numpy())])
    for k, atoms in enumerate(crystals):
        i, j, d_vec = neighbor_list("ijD", atoms, 4.0)
        mask = ((src >= offsets[k]) & (src < offsets[k + 1])).numpy()
        ours = sorted(zip((src[mask] - offsets[k]).tolist(), (dst[mask] - offsets[k]).tolist(), np.round(vec[mask].numpy(), 8).tolist()))
        ref = sorted(zip(i.tolist(), j.tolist(), np.round(d_vec, 8).tolist()))
        assert ours == ref


def test_sanity_checks():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    assert min_interatomic_distance(atoms.positions, atoms.cell.array) == pytest.approx(3.6 / np.sqrt(2))
    from e3relax_ase.training.distill.batched_results import RelaxResult

    def result(positions, cell):
        return RelaxResult(None, atoms.numbers, atoms.positions, atoms.cell.array, positions, cell, -1.0, 0.0, 0.0, 1, True, "converged")

    assert check_sane(result(atoms.positions, atoms.cell.array)) is None
    assert check_sane(result(atoms.positions, atoms.cell.array * 1.5)) == "volume_ratio"
    squeezed = atoms.positions.copy()
    squeezed[1] = squeezed[0] + 0.2  # 0.35 Å apart
    assert check_sane(result(squeezed, atoms.cell.array)) == "min_distance"
    assert check_sane(result(atoms.positions * np.nan, atoms.cell.array)) == "nonfinite"


@pytest.mark.slow
def test_sevennet_batched_matches_ase():
    """SevenNet-0: batched teacher equals SevenNetCalculator, and the relaxation equals ASE's."""
    pytest.importorskip("sevenn")
    from sevenn.calculator import SevenNetCalculator

    from e3relax_ase.training.distill.teacher_sevennet import SevenNetTeacher

    rng = np.random.default_rng(3)
    crystals = [bulk("Si", "diamond", a=5.43) * (2, 1, 1), bulk("Cu", "fcc", a=3.6, cubic=True)]
    for atoms in crystals:
        eps = rng.uniform(-0.04, 0.04, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    teacher = SevenNetTeacher("7net-0", device="cpu")
    calc = SevenNetCalculator("7net-0", device="cpu")

    positions = torch.tensor(np.concatenate([a.positions for a in crystals]))
    cells = torch.tensor(np.stack([a.cell.array for a in crystals]))
    numbers = torch.tensor(np.concatenate([a.numbers for a in crystals]))
    n_atoms = torch.tensor([len(a) for a in crystals])
    out = teacher(positions, cells, numbers, torch.repeat_interleave(torch.arange(2), n_atoms), n_atoms)
    offsets = np.concatenate([[0], np.cumsum(n_atoms.numpy())])
    for k, atoms in enumerate(crystals):
        a = atoms.copy()
        a.calc = calc
        assert out.energy[k].item() == pytest.approx(a.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(out.forces[offsets[k] : offsets[k + 1]].numpy(), a.get_forces(), atol=1e-5)
        np.testing.assert_allclose(out.stress[k].numpy(), a.get_stress(voigt=False), atol=1e-6)

    results = relax_all(_inputs(crystals), teacher, FireParams(fmax=0.02, max_steps=300), max_atoms=64)
    for atoms, r in zip(crystals, results):
        a = atoms.copy()
        a.calc = calc
        opt = FIRE(FrechetCellFilter(a), logfile=None)
        assert opt.run(fmax=0.02, steps=300) and r.converged
        assert abs(r.n_steps - opt.nsteps) <= 2
        np.testing.assert_allclose(r.positions, a.positions, atol=1e-3)
        np.testing.assert_allclose(r.cell, a.cell.array, atol=1e-3)


def _generated_emt_inputs() -> list[Atoms]:
    """Inputs from the issue-17 generators (symmetric crystal, layered cut, supercell), each with
    a start perturbation, in elements EMT knows."""
    from e3relax_ase.training.distill.inputs.layered import cut_slab
    from e3relax_ase.training.distill.inputs.starts import hard_start
    from e3relax_ase.training.distill.inputs.supercells import random_supercell
    from e3relax_ase.training.distill.inputs.wyckoff import random_symmetric_crystal

    rng = np.random.default_rng(17)
    bases = []
    while len(bases) < 2:
        atoms, _ = random_symmetric_crystal({29: 2, 79: 2}, int(rng.integers(1, 231)), {29: 11.8, 79: 17.0}, rng)
        if atoms is not None:
            bases.append(atoms)
    layered, _ = cut_slab(bulk("Ni", "fcc", a=3.52), rng, (2.5, 3.5), max_atoms=12)
    bases.append(layered)
    supercell, _ = random_supercell(bulk("Al", "fcc", a=4.05), rng, max_atoms=8)
    bases.append(supercell)
    # Milder than the production starts: FIRE paths of hundreds of steps drift apart by rounding.
    return [hard_start(a, rng, volume_range=(0.9, 1.1), max_shear=0.05, rattle_range=(0.03, 0.08))[0] for a in bases]


def test_generated_inputs_match_ase_fire_frechet():
    crystals = _generated_emt_inputs()
    results = relax_all(_inputs(crystals), EMTTeacher(), FireParams(fmax=0.02, max_steps=400), max_atoms=24)
    n_converged = 0
    for atoms, result in zip(crystals, results):
        ref, converged, n_steps = _ase_relax(atoms, 0.02, 400)
        assert result.converged == converged and result.n_steps == n_steps
        n_converged += converged
        np.testing.assert_allclose(result.positions, ref.positions, atol=1e-6)
        np.testing.assert_allclose(result.cell, ref.cell.array, atol=1e-6)
    assert n_converged >= 3


@pytest.mark.slow
@pytest.mark.parametrize("model, modal", [("7net-0_22May2024", None), ("7net-l3i5", None), ("7net-mf-0", "PBE"), ("7net-mf-0", "R2SCAN")])
def test_sevennet_wheel_models_match_their_calculator(model, modal):
    """The other models the sevenn wheel carries, batched, equal sevenn's calculator (the teacher comparison's inputs)."""
    pytest.importorskip("sevenn")
    from sevenn.calculator import SevenNetCalculator

    from e3relax_ase.training.distill.teacher_sevennet import SevenNetTeacher

    crystals = [bulk("NaCl", "rocksalt", a=5.5) * (2, 1, 1), bulk("Si", "diamond", a=5.4)]
    for k, atoms in enumerate(crystals):
        atoms.rattle(0.05, seed=k)
    teacher = SevenNetTeacher(model, modal=modal)
    calc = SevenNetCalculator(model, modal=modal) if modal else SevenNetCalculator(model)
    n_atoms = torch.tensor([len(a) for a in crystals])
    out = teacher(
        torch.tensor(np.concatenate([a.positions for a in crystals])),
        torch.tensor(np.stack([a.cell.array for a in crystals])),
        torch.tensor(np.concatenate([a.numbers for a in crystals])),
        torch.repeat_interleave(torch.arange(2), n_atoms),
        n_atoms,
    )
    offsets = np.concatenate([[0], np.cumsum(n_atoms.numpy())])
    for k, atoms in enumerate(crystals):
        a = atoms.copy()
        a.calc = calc
        assert out.energy[k].item() == pytest.approx(a.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(out.forces[offsets[k] : offsets[k + 1]].numpy(), a.get_forces(), atol=1e-5)
        np.testing.assert_allclose(out.stress[k].numpy(), a.get_stress(voigt=False), atol=1e-6)
    if modal is not None:
        with pytest.raises(ValueError, match="modal"):
            SevenNetTeacher(model)
    else:
        with pytest.raises(ValueError, match="no modal"):
            SevenNetTeacher(model, modal="PBE")
