"""Judging predictions in the worker processes (``relax_many(num_workers=N)``):
``submit_judging`` sends ``sanity_batch.judge_batch`` for every prediction, packed
``TASK_STRUCTURES`` to a task, while the relaxer runs the next forward pass;
``collect_verdicts`` waits for them. ``judge_here`` gives the same verdicts in this process.
"""

from __future__ import annotations

import numpy as np

from e3relax_ase.relax.pool import TASK_STRUCTURES, picklable_error
from e3relax_ase.relax.sanity import Confidence, SanityReport
from e3relax_ase.relax.sanity_batch import judge_batch


def submit_judging(pool, predictions: list, crystals: list, closest: list, relax_cell: bool, min_distance: float) -> list:
    """Send the judging of every prediction (``sanity_batch.judge_batch``) to the worker processes;
    returns the tasks.

    ``crystals``: each prediction's input (``CrystalArrays``); ``closest``: a lower bound on
    each input's pair distances. ``collect_verdicts`` waits for the tasks: in between, the
    relaxer runs the next batch's forward pass, so the judging costs it no wait.
    """
    tasks = []
    for start in range(0, len(crystals), TASK_STRUCTURES):
        group = range(start, min(start + TASK_STRUCTURES, len(crystals)))
        tasks.append(pool.submit(_judge_task, _judging_arrays(predictions, crystals, closest, group, relax_cell, min_distance)))
    return tasks


def judge_here(predictions: list, crystals: list, closest: list, relax_cell: bool, min_distance: float) -> list:
    """What ``submit_judging`` and ``collect_verdicts`` give, computed in this process."""
    return judge_batch(*_judging_arrays(predictions, crystals, closest, range(len(crystals)), relax_cell, min_distance))


def _judging_arrays(predictions: list, crystals: list, closest: list, group: range, relax_cell: bool, min_distance: float) -> tuple:
    """The arguments of ``sanity_batch.judge_batch`` for the structures ``group``, packed."""
    return (
        np.concatenate([predictions[k].positions for k in group], axis=1),
        np.array([predictions[k].cell for k in group]).swapaxes(0, 1),  # [T, n, 3, 3]
        np.concatenate([crystals[k].positions for k in group]),
        np.array([crystals[k].cell for k in group]),
        np.array([crystals[k].pbc for k in group]),
        np.array([closest[k] for k in group], dtype=np.float64),
        np.array([len(crystals[k].positions) for k in group], dtype=np.int64),
        relax_cell,
        min_distance,
    )


def collect_verdicts(tasks: list) -> list:
    """(sanity, confidence) or the exception, for each prediction of ``submit_judging``, in order."""
    return [verdict for task in tasks for verdict in _unpack_verdicts(task.result())]


def _judge_task(packed: tuple) -> tuple:
    """In a worker: ``sanity_batch.judge_batch`` for a packed group, as the relaxer runs it on a chunk
    in its own process (a structure's verdict does not depend on its batch)."""
    positions, cells, positions_input, cells_input, pbcs, closest, sizes, relax_cell, min_distance = packed
    floats = np.full((len(sizes), 6), np.nan)
    flags = np.zeros((len(sizes), 2), dtype=bool)
    problems: list[list[str]] = []
    errors: dict[int, Exception] = {}
    verdicts = judge_batch(positions, cells, positions_input, cells_input, pbcs, closest, sizes, relax_cell, min_distance)
    for k, verdict in enumerate(verdicts):
        if isinstance(verdict, Exception):
            errors[k] = picklable_error(verdict)
            problems.append([])
            continue
        sanity, signal = verdict
        floats[k] = (sanity.min_distance, sanity.volume_ratio, signal.max_displacement, signal.max_strain, signal.correction_ratio, signal.last_correction)
        flags[k] = (sanity.ok, signal.refine_advised)
        problems.append(sanity.problems)
    return floats, flags, problems, errors


def _unpack_verdicts(packed: tuple) -> list:
    """The worker's verdicts again: (SanityReport, Confidence) or the exception, in order."""
    floats, flags, problems, errors = packed
    verdicts = []
    for k in range(len(floats)):
        if k in errors:
            verdicts.append(errors[k])
            continue
        row = floats[k].tolist()
        sanity = SanityReport(bool(flags[k, 0]), problems[k], row[0], row[1])
        verdicts.append((sanity, Confidence(row[2], row[3], row[4], bool(flags[k, 1]), row[5])))
    return verdicts
