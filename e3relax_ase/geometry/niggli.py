"""Niggli reduction of many cells at once (numpy, vectorised over the cells).

The algorithm is the numerically stable one of Grosse-Kunstleve, Sauter and Adams (Acta Cryst.
A60, 2004, 1-6), in the form ASE's ``niggli_reduce_cell`` runs it: the metric
g = (a.a, b.b, c.c, 2 b.c, 2 c.a, 2 a.b) of the cell is tracked as g = D @ g0, with D an
integer 6x6 matrix, and each step multiplies the integer change of basis C (columns) and D by
a small integer matrix. Each cell takes the steps ASE takes, with the same tolerance
(eps = 1e-5 * volume^(1/3)) and the same comparisons, so the result is ASE's matrix
(tests/geometry/test_niggli.py compares them on thousands of cells).

Why not ASE's function: it runs one cell at a time in Python, paying the interpreter's
overhead at every step, which made it the largest single cost of preparing a crystal for the
network. Here every step is a handful of numpy operations on all the cells still being reduced,
so the per-step overhead is shared by the whole batch (ASE's against ours in tasks of 32:
``bench_host_stages.py`` in benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np

MAX_STEPS = 10_000  # ASE's limit; a cell not reduced by then is reported, not returned
EPS_FACTOR = 1e-5  # tolerance relative to volume^(1/3), ASE's default

# Row permutations of D for the two swap steps (A1: a <-> b, A2: b <-> c).
_SWAP_AB_ROWS = [1, 0, 2, 4, 3, 5]
_SWAP_BC_ROWS = [0, 2, 1, 3, 5, 4]


class NiggliError(ValueError):
    """A cell the reduction could not finish."""


def niggli_transforms(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer matrices T with T @ cell Niggli-reduced, for each of ``cells``.

    Args:
        cells: [n, 3, 3] float, rows are lattice vectors; every cell of full rank.

    Returns:
        (transforms [n, 3, 3] int64, converged [n] bool). Where ``converged`` is False the
        reduction did not finish in ``MAX_STEPS`` steps and the transform is the identity.
    """
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    n = len(cells)
    transforms = np.tile(np.eye(3, dtype=np.int64), (n, 1, 1))
    converged = np.zeros(n, dtype=bool)
    if n == 0:
        return transforms, converged
    g0 = _metric(cells)
    eps = EPS_FACTOR * np.abs(np.linalg.det(cells)) ** (1.0 / 3.0)

    # The cells still being reduced, and their state; finished ones leave these arrays.
    active = np.arange(n)
    basis = np.tile(np.eye(3, dtype=np.int64), (n, 1, 1))  # C: reduced = C.T @ cell
    metric_map = np.tile(np.eye(6, dtype=np.int64), (n, 1, 1))  # D: g = D @ g0
    for _ in range(MAX_STEPS):
        if len(active) == 0:
            break
        g = _apply(metric_map, g0[active])
        e = eps[active]
        swap_ab = _gt(g[:, 0], g[:, 1], e) | (_eq(g[:, 0], g[:, 1], e) & _gt(np.abs(g[:, 3]), np.abs(g[:, 4]), e))
        swap_bc = ~swap_ab & (_gt(g[:, 1], g[:, 2], e) | (_eq(g[:, 1], g[:, 2], e) & _gt(np.abs(g[:, 4]), np.abs(g[:, 5]), e)))
        if swap_ab.any():
            rows = np.flatnonzero(swap_ab)
            basis[rows] = -basis[rows][:, :, [1, 0, 2]]
            metric_map[rows] = metric_map[rows][:, _SWAP_AB_ROWS]
        if swap_bc.any():
            rows = np.flatnonzero(swap_bc)
            basis[rows] = -basis[rows][:, :, [0, 2, 1]]
            metric_map[rows] = metric_map[rows][:, _SWAP_BC_ROWS]

        # The others: make the off-diagonal terms all positive or all non-positive (A3/A4) ...
        rest = np.flatnonzero(~(swap_ab | swap_bc))
        if len(rest) == 0:
            continue
        c, d, e = basis[rest], metric_map[rest], e[rest]
        g = g[rest]
        signs = _sign_flips(_gt(g[:, 3:], 0.0, e[:, None] / 2).astype(np.int64) - _lt(g[:, 3:], 0.0, e[:, None] / 2))
        c *= signs[:, None, :]
        d[:, 3] *= (signs[:, 1] * signs[:, 2])[:, None]
        d[:, 4] *= (signs[:, 0] * signs[:, 2])[:, None]
        d[:, 5] *= (signs[:, 0] * signs[:, 1])[:, None]
        g = _apply(d, g0[active[rest]])

        # ... then at most one of the steps A5-A8; a cell that needs none is reduced.
        taken = np.zeros(len(rest), dtype=bool)
        for term, i, j, other, partner in _SHEARS:  # A5, A6, A7 in order
            t, gi = g[:, term], g[:, i]
            step = ~taken & (_gt(np.abs(t), gi, e) | (_eq(t, gi, e) & _lt(2 * g[:, other], g[:, partner], e)) | (_eq(t, -gi, e) & _lt(g[:, partner], 0.0, e)))
            if step.any():
                _shear(c, d, np.flatnonzero(step), np.sign(t[step]).astype(np.int64)[:, None], i, j, term, other, partner)
            taken |= step
        g0_, g1, _, g3, g4, g5 = g.T
        total = (((g0_ + g1) + g3) + g4) + g5  # summed in the order numpy sums g[[0, 1, 3, 4, 5]]
        step8 = ~taken & (_lt(total, 0.0, e) | (_eq(total, 0.0, e) & _gt(2 * (g0_ + g4) + g5, 0.0, e)))
        taken |= step8
        if step8.any():
            k = np.flatnonzero(step8)
            c[k, :, 2] += c[k, :, 0] + c[k, :, 1]
            old = d[k]
            d[k, 2] = old.sum(axis=1)
            d[k, 3] = old[:, 3] + 2 * old[:, 1] + old[:, 5]
            d[k, 4] = old[:, 4] + 2 * old[:, 0] + old[:, 5]
        basis[rest], metric_map[rest] = c, d

        finished = rest[~taken]
        if len(finished):
            done = active[finished]
            transforms[done] = np.swapaxes(basis[finished], 1, 2)
            converged[done] = True
            keep = np.ones(len(active), dtype=bool)
            keep[finished] = False
            active, basis, metric_map = active[keep], basis[keep], metric_map[keep]
    return transforms, converged


# Steps A5-A7: (metric term 2 x.y, vector x, vector y, the other two off-diagonal terms): when
# the term is too large, vector y -= sign(term) * vector x.
_SHEARS = ((3, 1, 2, 4, 5), (4, 0, 2, 3, 5), (5, 0, 1, 3, 4))


def _shear(c: np.ndarray, d: np.ndarray, k: np.ndarray, s: np.ndarray, i: int, j: int, term: int, other: int, partner: int) -> None:
    """Vector j -= s * vector i in the bases ``c[k]`` (columns), and the metric maps ``d[k]`` to
    match: |j|^2 gains |i|^2 - s (2 i.j), the term 2 i.j loses 2 s |i|^2, and the third term
    loses s times its partner."""
    c[k, :, j] -= s * c[k, :, i]
    d_i, d_term, d_partner = d[k, i], d[k, term], d[k, partner]
    d[k, j] = d[k, j] + d_i - s * d_term
    d[k, other] = d[k, other] - s * d_partner
    d[k, term] = d_term - 2 * s * d_i


def _metric(cells: np.ndarray) -> np.ndarray:
    """[n, 6] (a.a, b.b, c.c, 2 b.c, 2 c.a, 2 a.b) of each cell."""
    a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
    return np.stack(
        [_dot(a, a), _dot(b, b), _dot(c, c), 2 * _dot(b, c), 2 * _dot(c, a), 2 * _dot(a, b)],
        axis=1,
    )


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[:, 0] * y[:, 0] + x[:, 1] * y[:, 1] + x[:, 2] * y[:, 2]


def _apply(metric_map: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """g = D @ g0 for each cell."""
    return np.einsum("bij,bj->bi", metric_map.astype(np.float64), g0)


def _lt(x, y, eps):
    return x < y - eps


def _gt(x, y, eps):
    return y < x - eps


def _eq(x, y, eps):
    return ~(_lt(x, y, eps) | _gt(x, y, eps))


def _sign_flips(lmn: np.ndarray) -> np.ndarray:
    """[n, 3] in {-1, 0, 1}: the column signs (i, j, k) that make the off-diagonal metric terms
    all positive (product of their signs 1) or all non-positive (steps A3 and A4)."""
    product = lmn.prod(axis=1)
    all_positive = product == 1
    flips = np.where(lmn == 1, -1, 1)
    # A4: with an odd number of sign flips, the last zero term absorbs one more.
    odd = (flips.prod(axis=1) == -1) & (lmn == 0).any(axis=1)
    last_zero = 2 - np.argmax((lmn == 0)[:, ::-1], axis=1)
    flips[np.flatnonzero(odd), last_zero[odd]] = -1
    flips[(lmn == -1).all(axis=1)] = 1
    return np.where(all_positive[:, None], np.where(lmn == 0, 1, lmn), flips)
