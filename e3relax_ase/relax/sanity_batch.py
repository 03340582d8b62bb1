"""Judging many predictions at once (``judge_batch``): the verdicts of
``sanity.judge_prediction`` (sanity report and confidence), the common case in a few array
operations. The relaxer runs it on a chunk in its own process, as the workers do on a task
(``pool_judge``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from e3relax_ase.relax.sanity import (
    MIN_DISPLACEMENT,
    MIN_STRAIN,
    Confidence,
    SanityReport,
    _cell_problems,
    _searched_report,
    _stretch,
    judge_prediction,
    refine_advised,
)


def judge_batch(
    positions_layers: np.ndarray,
    cell_layers: np.ndarray,
    positions_input: np.ndarray,
    cells_input: np.ndarray,
    pbcs: np.ndarray,
    closest: np.ndarray,
    sizes: np.ndarray,
    relax_cell: bool,
    min_distance: float,
) -> list:
    """:func:`judge_prediction` of many predictions, the common case in a few array operations.

    ``judge_prediction``'s time is nearly all numpy's per-call overhead on 3x3 matrices (a
    worker's judging, old against new: ``bench_host_stages.py`` in benchmarks/README.md). Here
    the crystals periodic in 3D whose predicted layers are finite and whose cells are invertible
    (nearly all) are judged together: batched LAPACK calls on the 3x3 matrices (the routine a
    single call runs, per matrix) and elementwise products per atom (``_rows_times``), so a
    structure's verdict does not depend on the others in the batch. A fractional coordinate is
    the row times the inverse cell instead of a solve: the figures differ from
    ``judge_prediction``'s by rounding (1e-15 relative), the decisions do not
    (tests/relax/test_sanity_batch.py). The rest (slabs, non-finite values, singular cells) go through
    ``judge_prediction``, and a prediction whose close pairs ``no_close_pairs`` cannot rule out
    gets the neighbour search, as there.

    Args:
        positions_layers: [T, n_atoms, 3] every layer's positions of all structures, Å.
        cell_layers: [T, n_structures, 3, 3].
        positions_input: [n_atoms, 3]; cells_input: [n_structures, 3, 3]; pbcs: [n_structures, 3].
        closest: [n_structures] lower bounds on each input's pair distances, Å.
        sizes: [n_structures] atoms of each structure (at least one each).
        relax_cell, min_distance: as ``judge_prediction``.

    Returns:
        (SanityReport, Confidence) or the exception raised, for each structure.
    """
    positions_layers = np.asarray(positions_layers, dtype=np.float64)
    cell_layers = np.asarray(cell_layers, dtype=np.float64)
    positions_input = np.asarray(positions_input, dtype=np.float64)
    cells_input = np.asarray(cells_input, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    verdicts: list = [None] * n
    try:
        regular = _regular(positions_layers, cell_layers, cells_input, np.asarray(pbcs, dtype=bool), bounds)
        rows = np.flatnonzero(regular)
        if len(rows):
            if len(rows) == n:  # the common case: every structure
                atoms = np.arange(bounds[-1])
            else:
                atoms = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in rows.tolist()])
            judged = _judge_regular(
                positions_layers[:, atoms],
                cell_layers[:, rows],
                positions_input[atoms],
                cells_input[rows],
                np.asarray(closest, dtype=np.float64)[rows],
                sizes[rows],
                relax_cell,
                min_distance,
            )
            for row, verdict in zip(rows.tolist(), judged):
                verdicts[row] = verdict
    except Exception:  # noqa: BLE001 (an unforeseen batch failure: each structure alone below)
        verdicts = [None] * n
    for k in range(n):
        a, b = int(bounds[k]), int(bounds[k + 1])
        try:
            if verdicts[k] is None:
                verdicts[k] = judge_prediction(
                    positions_layers[:, a:b],
                    cell_layers[:, k],
                    positions_input[a:b],
                    cells_input[k],
                    np.asarray(pbcs[k], dtype=bool),
                    float(closest[k]),
                    relax_cell,
                    min_distance,
                )
            elif isinstance(verdicts[k], _NeedsSearch):
                pending = verdicts[k]
                sanity = _searched_report(pending.positions, pending.cell, np.ones(3, bool), min_distance, pending.problems, pending.ratio)
                verdicts[k] = (sanity, pending.confidence)
        except Exception as exc:  # noqa: BLE001 (a structure's failure is its own)
            verdicts[k] = exc
    return verdicts


@dataclass
class _NeedsSearch:
    """A verdict waiting for the close-pair search (``no_close_pairs`` could not rule one out)."""

    positions: np.ndarray
    cell: np.ndarray
    problems: list
    ratio: float
    confidence: Confidence


def _regular(positions_layers, cell_layers, cells_input, pbcs, bounds) -> np.ndarray:
    """[n_structures] bool: periodic in 3D, finite input and layers T-1 and T, invertible cells."""
    with np.errstate(all="ignore"):
        ok = pbcs.all(axis=1) & np.isfinite(cells_input).all(axis=(1, 2))
        for layer in range(max(0, len(cell_layers) - 2), len(cell_layers)):
            atoms_finite = np.isfinite(positions_layers[layer]).all(axis=1).astype(np.int64)
            ok &= np.add.reduceat(atoms_finite, bounds[:-1]) == np.diff(bounds)
            ok &= np.isfinite(cell_layers[layer]).all(axis=(1, 2))
        for cells in [cells_input] + [cell_layers[layer] for layer in range(max(0, len(cell_layers) - 2), len(cell_layers))]:
            ok[ok] &= np.linalg.det(cells[ok]) != 0
    return ok


def _rows_times(rows: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Row i of ``rows`` [n, 3] times matrix i of ``matrices`` [n, 3, 3], written out elementwise
    (each row's result depends on its own numbers only, whatever the batch)."""
    return rows[:, 0:1] * matrices[:, 0, :] + rows[:, 1:2] * matrices[:, 1, :] + rows[:, 2:3] * matrices[:, 2, :]


def _largest_norm(vectors: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per structure, the largest length among its atoms' ``vectors``."""
    return np.sqrt(np.maximum.reduceat((vectors * vectors).sum(axis=1), bounds[:-1]))


def _judge_regular(positions_layers, cell_layers, positions_input, cells_input, closest, sizes, relax_cell, min_distance) -> list:
    """``judge_batch`` for structures that ``_regular`` admits (all of those given)."""
    n = len(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    owner = np.repeat(np.arange(n), sizes)
    positions, cell = positions_layers[-1], cell_layers[-1]

    # Sanity, as check_prediction on the final structure.
    if relax_cell:
        final_positions, final_cell = positions, cell
    else:
        final_positions, final_cell = _rows_times(positions, np.linalg.solve(cell, cells_input)[owner]), cells_input
    det_input, det = np.linalg.det(cells_input), np.linalg.det(final_cell)
    lengths_product = np.prod(np.linalg.norm(final_cell, axis=2), axis=1)
    strain = np.linalg.solve(cells_input, cell)  # input cell -> predicted cell, also the confidence's strain
    deformation = strain if relax_cell else np.linalg.solve(cells_input, final_cell)
    try:
        smallest = np.linalg.svd(deformation, compute_uv=False)[:, -1]
    except np.linalg.LinAlgError:
        smallest = np.full(n, np.nan)  # nothing proven: every structure is searched
    moves = final_positions - _rows_times(positions_input, deformation[owner])
    bound = smallest * closest * (1.0 - 1e-9) - 2.0 * _largest_norm(moves, bounds)
    proven = np.isfinite(bound) & (bound > min_distance + 1e-6)

    # Confidence, as confidence(): total and last-layer non-affine moves and strains.
    fractional_input = _rows_times(positions_input, np.linalg.inv(cells_input)[owner])
    fractional = _rows_times(positions, np.linalg.inv(cell)[owner])
    d_total = _largest_norm(_rows_times(fractional - fractional_input, cell[owner]), bounds)
    s_total = _stretch(strain)
    if len(cell_layers) >= 2:
        previous = cell_layers[-2]
        fractional_previous = _rows_times(positions_layers[-2], np.linalg.inv(previous)[owner])
        d_last = _largest_norm(_rows_times(fractional - fractional_previous, cell[owner]), bounds)
        s_last = _stretch(np.linalg.solve(previous, cell))

    verdicts: list[tuple[SanityReport, Confidence] | _NeedsSearch] = []
    for k in range(n):
        if len(cell_layers) >= 2:
            dl, sl, dt, st = float(d_last[k]), float(s_last[k]), float(d_total[k]), float(s_total[k])
            ratio_last = max(dl / dt if dt > MIN_DISPLACEMENT else 0.0, sl / st if st > MIN_STRAIN else 0.0)
            signal = Confidence(dt, st, ratio_last, refine_advised(dl, sl, dt, st), dl)
        else:
            signal = Confidence(float(d_total[k]), float(s_total[k]), math.nan, False)
        ratio = float(det[k]) / float(det_input[k])
        problems, flat = _cell_problems(float(det[k]), float(det_input[k]), float(lengths_product[k]))
        if flat:
            verdicts.append((SanityReport(False, problems, volume_ratio=ratio), signal))
        elif proven[k]:
            verdicts.append((SanityReport(not problems, problems, math.inf, ratio), signal))
        else:
            a, b = bounds[k], bounds[k + 1]
            verdicts.append(_NeedsSearch(final_positions[a:b], final_cell[k], problems, ratio, signal))
    return verdicts
