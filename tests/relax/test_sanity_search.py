"""The sanity check's close-pair search at a wider radius names the same pair, at the same
distance, as the search at ``min_distance`` (sanity_search.closest_pair vs closest_pair_searched)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111

from e3relax_ase.geometry import validation
from e3relax_ase.keys import MIN_DISTANCE
from e3relax_ase.relax.sanity import check_prediction
from e3relax_ase.relax.sanity_search import closest_pair, closest_pair_searched


def _cells(rng):
    """(positions, cell, pbc) of awkward cells, each with a few close pairs planted."""
    wire = np.diag([3.0, 3.0, 300.0])
    long_wire = np.diag([2.8, 3.1, 3000.0])
    plate = np.diag([300.0, 300.0, 3.0])
    slab_box = np.diag([4.0, 4.0, 60.0])
    skewed = np.array([[5.0, 0.0, 0.0], [4.9, 1.0, 0.0], [0.3, 0.2, 5.0]])  # 11 degrees, not reduced
    left = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 4.5], [0.0, 5.0, 0.0]])  # left-handed
    tilted = np.array([[3.0, 0.0, 0.0], [1.0, 3.0, 0.0], [40.0, 25.0, 6.0]])  # long, tilted c
    out = []
    for cell, n, pbc in (
        (wire, 20, (True, True, True)),
        (long_wire, 20, (True, True, True)),
        (wire, 20, (False, False, True)),
        (plate, 20, (True, True, True)),
        (slab_box, 20, (True, True, False)),
        (skewed, 10, (True, True, True)),
        (left, 12, (True, True, True)),
        (tilted, 15, (True, True, True)),
        (np.diag([10.0, 10.0, 10.0]), 40, (True, True, True)),
    ):
        for _ in range(4):
            fractional = rng.uniform(0, 1, (n, 3))
            if not pbc[2]:
                fractional[:, 2] = rng.uniform(0.45, 0.55, n)  # atoms in the middle of the vacuum box
            positions = fractional @ cell
            for k in rng.choice(n - 1, size=3, replace=False):  # close pairs at random distances
                direction = rng.normal(size=3)
                positions[k + 1] = positions[k] + direction / np.linalg.norm(direction) * rng.uniform(0.05, 0.7)
            out.append((positions, cell, np.array(pbc)))
    slab = fcc111("Pt", (3, 3, 4), vacuum=20.0)
    slab.rattle(0.4, seed=2)
    out.append((slab.positions, slab.cell.array, slab.pbc))
    dense = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    dense.rattle(0.35, seed=5)
    out.append((dense.positions, dense.cell.array, dense.pbc))
    return out


def _ties_and_borders():
    """Exact ties between different pairs, and distances on the border min_distance = 0.5."""
    cell = np.diag([8.0, 9.0, 10.0])
    pbc = np.ones(3, bool)
    centre = np.array([[4.0, 4.0, 4.0]])
    tie = np.concatenate([centre, centre + [0.25, 0, 0], centre - [0.25, 0, 0], [[1.0, 1.0, 1.0]]])  # (0,1) ties (0,2)
    tie_same_pair = np.array([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [5.0, 5.0, 5.0]])  # (0,1) and (1,0): one pair
    border = np.array([[1.0, 1.0, 1.0], [1.5, 1.0, 1.0], [5.0, 5.0, 5.0]])  # exactly 0.5 Å apart
    just_under = np.array([[1.0, 1.0, 1.0], [np.nextafter(1.5, 0.0), 1.0, 1.0], [5.0, 5.0, 5.0]])
    just_over = np.array([[1.0, 1.0, 1.0], [np.nextafter(1.5, 2.0), 1.0, 1.0], [5.0, 5.0, 5.0]])
    image = (np.array([[0.1, 0.2, 0.3]]), np.diag([0.45, 6.0, 6.0]), pbc)  # an atom 0.45 Å from its own image
    thin_image = (np.array([[0.1, 0.2, 0.3], [0.1, 1.2, 0.3]]), np.diag([0.3, 40.0, 40.0]), pbc)
    return [(p, cell, pbc) for p in (tie, tie_same_pair, border, just_under, just_over)] + [image, thin_image]


CASES = _cells(np.random.default_rng(11)) + _ties_and_borders()


@pytest.mark.parametrize("min_distance", [0.5, 0.1, 1.2])
def test_closest_pair_is_the_search_at_min_distance(min_distance):
    found = 0
    for positions, cell, pbc in CASES:
        fast = closest_pair(positions, cell, pbc, min_distance)
        reference = closest_pair_searched(positions, cell, pbc, min_distance)
        assert fast == reference
        if fast is not None:
            assert type(fast[0]) is float and fast[1] <= fast[2]
        found += fast is not None
    assert found >= (3 if min_distance < 0.5 else len(CASES) // 3)  # the cases do hold close pairs


def test_fast_search_is_used_and_falls_back_where_it_must(monkeypatch):
    """Ordinary cells are settled by the wide search alone; ties and border distances by the
    search at min_distance, with the same answer."""
    radii = []
    original = validation.neighbor_pairs

    def spy(positions, cell, pbc, cutoff):
        radii.append(cutoff)
        return original(positions, cell, pbc, cutoff)

    monkeypatch.setattr(validation, "neighbor_pairs", spy)
    for positions, cell, pbc in _cells(np.random.default_rng(12)):
        radii.clear()
        closest_pair(positions, cell, pbc, 0.5)
        assert len(radii) == 1 and radii[0] > 0.5
    tie, tie_same_pair, border, just_under, just_over = _ties_and_borders()[:5]
    for case in (tie, border, just_under, just_over):
        radii.clear()
        fast = closest_pair(*case, 0.5)
        assert radii[-1] == 0.5  # decided by the search at min_distance
        assert fast == closest_pair_searched(*case, 0.5)
    assert closest_pair(*tie, 0.5)[:1] == (0.25,)
    radii.clear()
    distance, i, j = closest_pair(*tie_same_pair, 0.5)
    assert (i, j) == (0, 1) and abs(distance - 0.2) < 1e-12 and radii == [radii[0]] and radii[0] > 0.5


def test_check_prediction_reports_as_before():
    """check_prediction's report with the wide search = with the search at min_distance."""
    for positions, cell, pbc in CASES:
        got = check_prediction(positions, cell, pbc, cell)
        found = closest_pair_searched(positions, cell, pbc, MIN_DISTANCE)
        expected_problems = []
        if found is not None:
            d, i, j = found
            expected_problems.append(f"atoms {i} and {j} are {d:.3f} Å apart (< {MIN_DISTANCE} Å)")
        assert got.problems == expected_problems
        assert got.ok == (found is None)
        assert got.min_distance == (found[0] if found is not None else np.inf)
