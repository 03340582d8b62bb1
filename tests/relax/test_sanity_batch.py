"""``sanity_batch.judge_batch``: the verdicts of ``judge_prediction``, many structures at once.

A structure's verdict must not depend on the other structures of its batch (the workers judge
tasks of 32, the relaxer a whole chunk, ``relax`` one): bit for bit. Against the one-at-a-time
reference the decisions (ok, the problems, refinement advice) are the same and the figures agree
to rounding. The cases include every branch: flat and flipped cells, volume changes, close
pairs that the bound cannot rule out (searched), NaN predictions, singular cells, slabs, and
relax_cell=False.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111

from e3relax_ase.relax.sanity import judge_prediction
from e3relax_ase.relax.sanity_batch import judge_batch


def _case(atoms, rng, kind):
    """(layers positions [T, n, 3], layer cells [T, 3, 3], input positions, input cell, pbc)."""
    positions, cell = atoms.positions.copy(), atoms.cell.array.copy()
    layers = 4
    steps = np.linspace(0.25, 1.0, layers)
    target_cell = cell @ (np.eye(3) + rng.normal(0, 0.02, (3, 3)))
    target = positions @ np.linalg.solve(cell, target_cell) + rng.normal(0, 0.05, positions.shape)
    if kind == "volume":
        target_cell, target = cell * 1.5, positions * 1.5
    elif kind == "flipped":
        target_cell = cell * np.array([[-1.0], [1.0], [1.0]])
    elif kind == "flat":
        target_cell = cell.copy()
        target_cell[2] = target_cell[0] + target_cell[1]
    elif kind == "close":
        target = target.copy()
        target[1] = target[0] + np.array([0.2, 0.1, 0.0])
    elif kind == "nan":
        target = target.copy()
        target[0, 0] = np.nan
    elif kind == "singular_previous":
        pass
    position_layers = np.stack([positions + s * (target - positions) for s in steps])
    cell_layers = np.stack([cell + s * (target_cell - cell) for s in steps])
    if kind == "singular_previous":
        cell_layers[-2] = 0.0
    return position_layers, cell_layers, positions, cell, np.asarray(atoms.pbc, dtype=bool)


def _cases():
    rng = np.random.default_rng(5)
    crystals = [bulk("NaCl", "rocksalt", a=5.64) * (1, 1, 2), bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Si", "diamond", a=5.43)]
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    kinds = ["plain", "volume", "flipped", "flat", "close", "nan", "singular_previous"]
    out = []
    for k, kind in enumerate(kinds * 3):
        atoms = crystals[k % len(crystals)].copy()
        atoms.rattle(0.02, seed=k)
        out.append(_case(atoms, rng, kind))
    out.append(_case(slab, rng, "plain"))
    return out


CASES = _cases()


def _batch(cases, relax_cell, min_distance=0.5):
    return judge_batch(
        np.concatenate([c[0] for c in cases], axis=1),
        np.stack([c[1] for c in cases], axis=1),
        np.concatenate([c[2] for c in cases]),
        np.stack([c[3] for c in cases]),
        np.stack([c[4] for c in cases]),
        np.full(len(cases), 1.5),
        np.array([len(c[2]) for c in cases]),
        relax_cell,
        min_distance,
    )


def _figures(verdict):
    sanity, signal = verdict
    return [sanity.min_distance, sanity.volume_ratio, signal.max_displacement, signal.max_strain, signal.correction_ratio, signal.last_correction]


@pytest.mark.parametrize("relax_cell", [True, False])
def test_a_verdict_does_not_depend_on_its_batch(relax_cell):
    together = _batch(CASES, relax_cell)
    for case, verdict in zip(CASES, together):
        (alone,) = _batch([case], relax_cell)
        assert repr(alone) == repr(verdict)  # every figure, to the bit (repr round-trips floats)
    order = np.random.default_rng(0).permutation(len(CASES))
    shuffled = _batch([CASES[k] for k in order], relax_cell)
    assert [repr(v) for v in shuffled] == [repr(together[k]) for k in order]


@pytest.mark.parametrize("relax_cell", [True, False])
def test_verdicts_are_those_of_judge_prediction(relax_cell):
    verdicts = _batch(CASES, relax_cell)
    kinds = set()
    for case, verdict in zip(CASES, verdicts):
        positions_layers, cell_layers, positions, cell, pbc = case
        try:
            want = judge_prediction(positions_layers, cell_layers, positions, cell, pbc, 1.5, relax_cell, 0.5)
        except Exception as exc:  # e.g. a flat predicted cell with relax_cell=False: that structure fails
            assert type(verdict) is type(exc)
            continue
        got = verdict
        assert got[0].ok == want[0].ok and got[1].refine_advised == want[1].refine_advised
        assert len(got[0].problems) == len(want[0].problems)
        for a, b in zip(got[0].problems, want[0].problems):
            assert a.split(" ")[:2] == b.split(" ")[:2]  # the same problem (its figures may round differently)
        np.testing.assert_allclose(_figures(got), _figures(want), rtol=1e-12, atol=1e-13, equal_nan=True)
        kinds.update(p.split(" ")[0] for p in want[0].problems)
    assert {"atoms", "prediction"} <= kinds  # every branch was taken
    if relax_cell:  # otherwise the input cell is kept: no cell problems
        assert {"det(cell)", "volume"} <= kinds


def test_a_failing_structure_fails_alone(monkeypatch):
    import e3relax_ase.relax.sanity as sanity
    import e3relax_ase.relax.sanity_batch as sanity_batch

    original = sanity._searched_report

    def broken(positions, *args):
        if len(positions) == len(CASES[4][2]):
            raise RuntimeError("search broke")
        return original(positions, *args)

    monkeypatch.setattr(sanity, "_searched_report", broken)
    monkeypatch.setattr(sanity_batch, "_searched_report", broken)
    verdicts = _batch(CASES, True)
    assert isinstance(verdicts[4], RuntimeError)  # the "close" case needs the search
    assert sum(isinstance(v, Exception) for v in verdicts) == sum(
        1 for k, c in enumerate(CASES) if len(c[2]) == len(CASES[4][2]) and isinstance(verdicts[k], Exception)
    )
    assert all(isinstance(v, tuple) for k, v in enumerate(verdicts) if len(CASES[k][2]) != len(CASES[4][2]))
