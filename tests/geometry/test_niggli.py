"""The vectorised Niggli reduction (``e3relax_ase.geometry.niggli``) against ASE's ``niggli_reduce_cell``.

Our reduction must give ASE's integer matrix for every cell, one cell at a time or many at once:
the canonical form (and so every prediction) depends on it. The cells include ones far from
reduced (many steps), ties of equal lengths (the tolerance-dependent branches), and random ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from e3relax_ase.geometry.canonical import reduce_cell, reduce_cells
from e3relax_ase.geometry.niggli import niggli_transforms
from tests.paths import ROOT


def ase_transform(cell):
    from ase.build.tools import niggli_reduce_cell

    return np.asarray(niggli_reduce_cell(cell)[1]).T.astype(np.int64)


def scrambled(cell, rng, moves=6):
    """``cell`` in another basis of the same lattice: random integer shears."""
    matrix = np.eye(3, dtype=np.int64)
    for _ in range(moves):
        i, j = rng.choice(3, 2, replace=False)
        matrix[i] += rng.integers(-2, 3) * matrix[j]
    return matrix @ cell


def awkward_cells():
    rng = np.random.default_rng(11)
    symmetric = [
        bulk(name, crystal, a=a).cell.array
        for name, crystal, a in (("Cu", "fcc", 3.6), ("Fe", "bcc", 2.87), ("Si", "diamond", 5.43), ("NaCl", "rocksalt", 5.64))
    ]
    symmetric += [bulk("Mg", "hcp", a=3.2, c=5.2).cell.array, np.diag([4.0, 4.0, 4.0]), np.diag([3.0, 3.0, 7.0])]
    cells = list(symmetric)
    cells += [scrambled(c, rng) for c in symmetric for _ in range(30)]  # ties in a skewed basis
    cells += [np.eye(3) + rng.uniform(-0.45, 0.45, (3, 3)) for _ in range(200)]
    random = rng.normal(size=(300, 3, 3)) * rng.uniform(1, 10, size=(300, 1, 1))
    cells += [c for c in random if abs(np.linalg.det(c)) > 0.5]
    cells.append(np.array([[3.0, 0, 0], [7 * 3.0, 4.0, 0], [2.0, -5 * 4.0, 5.0]]))  # far from reduced
    cells.append(-np.eye(3) * 5.0)  # left-handed
    return np.stack(cells)


CELLS = awkward_cells()


def test_batched_reduction_is_ases_for_every_cell():
    transforms, converged = niggli_transforms(CELLS)
    assert converged.all()
    for cell, transform in zip(CELLS, transforms):
        assert np.array_equal(transform, ase_transform(cell))


def test_one_cell_at_a_time_gives_the_batched_result():
    transforms, _ = reduce_cells(CELLS)
    for k in range(0, len(CELLS), 7):
        assert np.array_equal(reduce_cell(CELLS[k], np.ones(3, bool)), transforms[k])


def test_result_does_not_depend_on_the_other_cells_in_the_batch():
    transforms, _ = niggli_transforms(CELLS)
    order = np.random.default_rng(3).permutation(len(CELLS))
    shuffled, _ = niggli_transforms(CELLS[order[:50]])
    assert np.array_equal(shuffled, transforms[order[:50]])


def test_reduced_cell_is_niggli_reduced_and_unimodular():
    transforms, ok = reduce_cells(CELLS)
    assert ok.all()
    assert np.all(np.abs(np.rint(np.linalg.det(transforms.astype(float)))) == 1)
    reduced = transforms.astype(float) @ CELLS
    lengths = np.linalg.norm(reduced, axis=2)
    tolerance = 1e-5 * np.abs(np.linalg.det(CELLS)) ** (1 / 3)
    assert np.all(lengths[:, 0] <= lengths[:, 1] + tolerance) and np.all(lengths[:, 1] <= lengths[:, 2] + tolerance)
    # Reduced: no lattice vector shortened by adding or subtracting another one.
    for i in range(3):
        for j in range(3):
            if i != j:
                for sign in (1, -1):
                    shorter = np.linalg.norm(reduced[:, i] + sign * reduced[:, j], axis=1)
                    assert np.all(shorter >= lengths[:, i] - 1e-6 * lengths[:, i])


def test_unfinished_reduction_is_reported_not_returned(monkeypatch):
    import e3relax_ase.geometry.niggli as niggli

    far = np.array([[3.0, 0, 0], [7 * 3.0, 4.0, 0], [2.0, -5 * 4.0, 5.0]])  # takes several steps
    monkeypatch.setattr(niggli, "MAX_STEPS", 2)
    transforms, ok = reduce_cells(np.stack([np.eye(3) * 4.0, far]))
    assert ok.tolist() == [True, False]
    with pytest.raises(ValueError, match="Niggli reduction not done"):
        reduce_cell(far, np.ones(3, bool))


def test_slabs_and_wires_are_not_reduced():
    cell = scrambled(np.diag([3.0, 4.0, 20.0]), np.random.default_rng(1))
    for pbc in ([True, True, False], [False, False, True]):
        assert np.array_equal(reduce_cell(cell, np.array(pbc)), np.eye(3, dtype=np.int64))


def test_empty_batch():
    transforms, ok = niggli_transforms(np.zeros((0, 3, 3)))
    assert transforms.shape == (0, 3, 3) and ok.shape == (0,)


def _dft_input_cells():
    """Every unrelaxed cell of the NREL test split, and each in three scrambled bases."""

    from e3relax_ase.training.data.pairs import load_pairs

    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    cells = np.asarray(pairs.cell_unrelaxed, dtype=np.float64)
    rng = np.random.default_rng(21)
    return np.concatenate([cells, np.stack([scrambled(c, rng) for c in cells for _ in range(3)])])


def test_batched_reduction_is_ases_on_the_dft_inputs_in_any_basis():
    cells = _dft_input_cells()
    assert len(cells) >= 3000
    transforms, converged = niggli_transforms(cells)
    assert converged.all()
    mismatched = [k for k, cell in enumerate(cells) if not np.array_equal(transforms[k], ase_transform(cell))]
    assert mismatched == []
