"""Preparing structures in the worker processes (``relax_many(num_workers=N)``):
``prepared_in_pool`` sends structures ``TASK_STRUCTURES`` to a task, each worker runs
``prepare_structure`` and ``graph_edges`` on them (``_prepare_task``), and the outcomes travel
back packed as a few concatenated arrays (``_pack_outcomes`` / ``_unpack_outcomes``).

The items are those the relaxer prepares in its own process (``prepare``): the same functions
(``preparation``) on the same numbers.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from e3relax_ase.geometry.canonical import CanonicalForm, reduce_cells
from e3relax_ase.geometry.neighbors import capped_edges_many
from e3relax_ase.geometry.validation import StructureReport
from e3relax_ase.relax.pool import TASK_STRUCTURES, picklable_error
from e3relax_ase.relax.preparation import UNNAMED, PreparationSettings, graph_edges, named, prepare_structure

# How far the workers prepare ahead of the network: TASKS_IN_FLIGHT_PER_WORKER tasks per worker
# (16: more than one GPU chunk of CUDA_BATCH_STRUCTURES, so the next chunk is being prepared
# while one runs; with 4, workers idled once 4 x 32 structures each were done), and at most
# READ_AHEAD_ATOMS atoms, which bounds the memory for large crystals as the old limit of 4 did.
TASKS_IN_FLIGHT_PER_WORKER = 16
READ_AHEAD_ATOMS = 1_500_000


class StructureSpec(NamedTuple):
    """What a worker needs to prepare one structure: the arguments of ``prepare_arrays``."""

    numbers: np.ndarray  # int64
    positions: np.ndarray  # float64, (n, 3)
    cell: np.ndarray  # float64, (3, 3)
    pbc: np.ndarray  # bool, (3,)
    name: str | None  # None: named only if it fails, here (naming may take time)
    lengths: dict  # the length of every other per-atom array, by key


def prepared_in_pool(structures: Iterable, shell: Callable, pool, num_workers: int, settings: PreparationSettings) -> Generator:
    """(index, entry, outcome) for each of ``structures``, in order, prepared in ``pool``.

    ``shell(index, structure)`` runs here first: it returns ``(entry, StructureSpec)`` to have
    the structure prepared by a worker, whose outcome is then (report, form, edges) or the
    exception (naming the structure by ``entry.name``); anything else is passed on as the entry,
    with outcome None. Structures go ``TASK_STRUCTURES`` to a task, and at most
    ``TASKS_IN_FLIGHT_PER_WORKER * num_workers`` tasks are in flight, fewer (but one per worker)
    once they hold ``READ_AHEAD_ATOMS`` atoms. An exception from
    ``structures`` itself is raised after every structure before it has come out.
    """
    in_flight: deque = deque()  # (entries, future or None)
    task_atoms: deque = deque()  # atoms of each in-flight task
    atoms_in_flight = 0
    entries: list = []  # (index, (entry, spec) or an entry passed on)
    waiting = 0  # entries waiting for a worker
    failure = None
    try:
        iterator = enumerate(structures)
        while True:
            try:
                index, structure = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # the input itself failed: what came before still runs
                failure = exc
                break
            entry = shell(index, structure)
            entries.append((index, entry))
            waiting += isinstance(entry, tuple)
            if waiting >= TASK_STRUCTURES:
                in_flight.append(_submit(pool, entries, settings))
                task_atoms.append(_atoms_of(entries))
                atoms_in_flight += task_atoms[-1]
                entries, waiting = [], 0
            while len(in_flight) > TASKS_IN_FLIGHT_PER_WORKER * num_workers or (len(in_flight) > num_workers and atoms_in_flight > READ_AHEAD_ATOMS):
                atoms_in_flight -= task_atoms.popleft()
                yield from _collect(*in_flight.popleft())
        if entries:
            in_flight.append(_submit(pool, entries, settings))
        while in_flight:
            yield from _collect(*in_flight.popleft())
        if failure is not None:
            raise failure
    finally:
        for _, task in in_flight:
            if task is not None:
                task.cancel()


def _atoms_of(entries: list) -> int:
    """Atoms of the structures among ``entries`` that were sent to a worker."""
    return sum(len(entry[1].numbers) for _, entry in entries if isinstance(entry, tuple))


def _submit(pool, entries: list, settings: PreparationSettings):
    """Send the specs among ``entries`` to the pool as one packed task."""
    specs = [entry[1][1] for entry in entries if isinstance(entry[1], tuple)]
    if not specs:
        return entries, None
    packed = (
        np.concatenate([s.numbers for s in specs]),
        np.concatenate([s.positions for s in specs]),
        np.array([s.cell for s in specs]),  # np.array, not np.stack: the same array, faster for many small ones
        np.array([s.pbc for s in specs]),
        np.array([len(s.numbers) for s in specs], dtype=np.int64),
        [s.name if s.name is not None else UNNAMED for s in specs],
        [s.lengths for s in specs],
    )
    return entries, pool.submit(_prepare_task, packed, settings)


def _collect(entries: list, task) -> Iterator:
    """(index, entry, outcome) for ``entries``, with the worker's outcomes: (report, form,
    edges, vacuum layout or None) or the exception."""
    packed, layouts = task.result() if task is not None else ((0, {}, None), {})
    outcomes = _unpack_outcomes(packed)
    k = 0
    for index, entry in entries:
        outcome = None
        if isinstance(entry, tuple):
            entry = entry[0]
            outcome = next(outcomes)
            outcome = named(outcome, functools.partial(getattr, entry, "name"))  # entry.name, read only if needed
            if not isinstance(outcome, Exception):
                outcome = (*outcome, layouts.get(k))
            k += 1
        yield index, entry, outcome


def _prepare_task(packed: tuple, settings: PreparationSettings) -> tuple:
    """In a worker: ``prepare_arrays`` and ``graph_edges`` (as ``capped_edges_many``, the same
    edges) for a packed group of structures."""
    numbers, positions, cells, pbcs, sizes, names, lengths = packed
    transforms = task_transforms(cells, pbcs)
    outcomes = []
    layouts = {}  # k -> VacuumLayout, for the (rare) structures with vacuum along a periodic axis
    start = 0
    for k, size in enumerate(sizes.tolist()):
        stop = start + size
        try:
            prepared, layout = prepare_structure(
                numbers[start:stop],
                positions[start:stop],
                cells[k],
                pbcs[k],
                name=names[k],
                per_atom_arrays={key: range(n) for key, n in lengths[k].items()},
                settings=settings,
                transform=transforms[k],
            )
            outcomes.append(prepared)
            if layout is not None:
                layouts[k] = layout
        except Exception as exc:
            outcomes.append(picklable_error(exc))
        start = stop
    # The graph edges of every prepared structure in one pass (graph_edges, batched); should
    # that fail, each structure alone, so that a failure stays its structure's own.
    done = [k for k, o in enumerate(outcomes) if not isinstance(o, Exception)]
    edges: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None]
    try:
        edges = capped_edges_many([outcomes[k].pairs for k in done], [len(outcomes[k].form.positions) for k in done], settings.checks["max_neighbors"])
    except Exception:  # noqa: BLE001
        edges = [None] * len(done)
    for k, edge in zip(done, edges):
        try:
            edge = edge if edge is not None else graph_edges(outcomes[k], settings)
            outcomes[k] = (outcomes[k].report, outcomes[k].form, edge)
        except Exception as exc:
            outcomes[k] = picklable_error(exc)
    return _pack_outcomes(outcomes), layouts


def task_transforms(cells: np.ndarray, pbcs: np.ndarray) -> list:
    """The Niggli transform of each 3D-periodic cell of a task, from one vectorised reduction
    (``canonical.reduce_cells``), much cheaper per cell than one at a time
    (``bench_host_stages.py`` in benchmarks/README.md). None where ``prepare_arrays`` must
    reduce (and refuse) the cell itself: not periodic in 3D, not finite, degenerate, or not
    reduced."""
    transforms = [None] * len(cells)
    with np.errstate(all="ignore"):
        usable = pbcs.all(axis=1) & np.isfinite(cells).all(axis=(1, 2))
        usable[usable] &= np.abs(np.linalg.det(cells[usable])) > 1e-8
    rows = np.flatnonzero(usable)
    if len(rows):
        reduced, ok = reduce_cells(cells[rows])
        for row, transform, good in zip(rows.tolist(), reduced, ok.tolist()):
            if good:
                transforms[row] = transform
    return transforms


def _pack_outcomes(outcomes: list) -> tuple:
    """Worker results as a few concatenated arrays (cheap to send), exceptions apart."""
    errors = {k: o for k, o in enumerate(outcomes) if isinstance(o, Exception)}
    done = [o for o in outcomes if not isinstance(o, Exception)]
    if not done:
        return len(outcomes), errors, None
    reports = np.array([(r.n_atoms, r.n_edges) for r, _, _ in done], dtype=np.int64)
    closest = np.array([r.min_distance for r, _, _ in done], dtype=np.float64)
    forms = (
        np.concatenate([f.positions for _, f, _ in done]),
        np.stack([f.cell for _, f, _ in done]),
        np.stack([f.transform for _, f, _ in done]),
        _narrowest(np.concatenate([f.image_shift for _, f, _ in done])),
    )
    edges = (
        _narrowest(np.concatenate([e[0] for _, _, e in done])),
        _narrowest(np.concatenate([e[1] for _, _, e in done])),
        _narrowest(np.concatenate([e[2].reshape(-1, 3) for _, _, e in done])),
        np.array([len(e[0]) for _, _, e in done], dtype=np.int64),
    )
    return len(outcomes), errors, (reports, closest, forms, edges)


def _narrowest(integers: np.ndarray) -> np.ndarray:
    """``integers`` in the smallest of int8 / int16 / int32 / int64 that holds them.

    Edge indices and lattice shifts are small, and the edges are most of what a worker sends
    back (~6 kB of int64 a structure): narrowed, the transfer and its pickling in the main
    process shrink about 4x. Their users widen them exactly (``graph_from_edges`` adds int64
    offsets and converts shifts to floats; ``CanonicalForm.restore`` converts to floats).
    """
    if integers.size == 0:
        return integers
    low, high = int(integers.min()), int(integers.max())
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return integers.astype(dtype)
    return integers


def _unpack_outcomes(packed: tuple) -> Iterator:
    """The worker's outcomes again: (report, form, edges) or the exception, in order."""
    count, errors, arrays = packed
    if arrays is not None:
        reports, closest, (wrapped, cells, transforms, shifts), (src, dst, edge_shift, edge_counts) = arrays
        atom_bounds = np.concatenate([[0], np.cumsum(reports[:, 0])]).tolist()
        edge_bounds = np.concatenate([[0], np.cumsum(edge_counts)]).tolist()
    k = 0
    for position in range(count):
        if position in errors:
            yield errors[position]
            continue
        a, b = atom_bounds[k], atom_bounds[k + 1]
        e, f = edge_bounds[k], edge_bounds[k + 1]
        report = StructureReport(n_atoms=int(reports[k, 0]), n_edges=int(reports[k, 1]), min_distance=float(closest[k]))
        form = CanonicalForm(wrapped[a:b], cells[k], transforms[k], shifts[a:b])
        yield report, form, (src[e:f], dst[e:f], edge_shift[e:f])
        k += 1
