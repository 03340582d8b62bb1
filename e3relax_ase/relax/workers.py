"""Preparing structures and judging predictions beside the network: the machinery behind
``relax_many(prefetch=True)`` and ``relax_many(num_workers=N)``.

``prefetch=True`` runs the relaxer's own preparation in a background thread (``prefetched``).
``num_workers=N`` has N worker processes validate each structure, find its canonical form and
its graph edges (``prepared_in_pool``), and later run the sanity checks and confidence of its
prediction (``submit_judging`` / ``collect_verdicts``); the main process keeps the Atoms objects
and the network.

Every path gives the same results because every path runs the same functions on the same
numbers: ``graph_edges`` here and ``sanity.judge_batch``, which the relaxer calls in its own
process as the workers do in theirs. What a worker runs is module-level (the
pool pickles functions by name), and this module never imports ``e3relax_ase.relax.relaxer``: a
spawned worker imports only what the work needs, and the relaxer can import this module.
Arrays travel packed, ``TASK_STRUCTURES`` structures to a task, as a few concatenated arrays:
cheap to send, where a list of small objects is not.
"""

from __future__ import annotations

import functools
import os
import pickle
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from e3relax_ase.geometry.canonical import CanonicalForm, reduce_cells
from e3relax_ase.geometry.graph import capped_edges, capped_edges_many
from e3relax_ase.geometry.vacuum import ClusterError, find_vacuum
from e3relax_ase.geometry.validation import InvalidStructureError, PreparedCrystal, StructureReport, prepare_arrays
from e3relax_ase.relax.sanity import Confidence, SanityReport, judge_batch, judge_prediction  # noqa: F401 (judge_prediction: re-exported)

PREFETCH_ITEMS = 4096  # most structures prepared ahead of the network by the background thread
TASK_STRUCTURES = 32  # structures per task sent to a worker process
# How far the workers prepare ahead of the network: TASKS_IN_FLIGHT_PER_WORKER tasks per worker
# (16: more than one GPU chunk of CUDA_BATCH_STRUCTURES, so the next chunk is being prepared
# while one runs; with 4, workers idled once 4 x 32 structures each were done), and at most
# READ_AHEAD_ATOMS atoms, which bounds the memory for large crystals as the old limit of 4 did.
TASKS_IN_FLIGHT_PER_WORKER = 16
READ_AHEAD_ATOMS = 1_500_000
# "auto" worker counts (CLI --workers): two cores stay for the relaxing process (its main
# thread, the pool's feeder and reader threads); on a 16-core GPU host 14 workers were faster
# end to end than 12 or 15 (an older benchmarks/README.md, in git history).
AUTO_MAX_WORKERS = 14
AUTO_RESERVED_CORES = 2  # on a share of 8 cores or more; 1 on smaller shares
AUTO_MIN_STRUCTURES = 256  # fewer structures than this are not worth starting workers for
UNNAMED = "\x00unnamed\x00"  # stands for a structure's name until it fails (naming may take time)


# --- the work, run by the relaxer itself or by a worker --------------------------------------------


@dataclass
class PreparationSettings:
    """What preparing a structure needs from the relaxer (picklable, for worker processes)."""

    checks: dict  # keyword arguments of validation.prepare_arrays
    vacuum_gap: float | None = None  # Å | find vacuum along periodic axes (e3relax_ase.geometry.vacuum); None: do not look
    allow_cluster: bool = False  # relax an isolated cluster in a box (keeping the box) instead of refusing it


def prepare_structure(numbers, positions, cell, pbc, *, name: str, per_atom_arrays: dict, settings: PreparationSettings, transform=None):
    """Validate one structure for the network, after looking for vacuum along its periodic axes.

    Returns:
        (PreparedCrystal, VacuumLayout or None). With vacuum axes, the crystal was prepared as
        the network will see it: those axes non-periodic, the atoms moved together
        (``layout.positions``, ``layout.pbc``); an allowed cluster is prepared as given.

    Raises:
        InvalidStructureError: refused by validation, or an isolated cluster (``ClusterError``)
            when clusters are not allowed.
    """
    layout = find_vacuum(positions, cell, pbc, settings.vacuum_gap) if settings.vacuum_gap else None
    if layout is not None:
        if layout.cluster:
            if not settings.allow_cluster:
                raise ClusterError(
                    f"{name}: an isolated cluster or molecule in a periodic box (vacuum of {layout.describe()}), not a "
                    "crystal: the network would reshape its box; allow_cluster=True (CLI --allow-cluster) relaxes it "
                    "keeping the box"
                )
        else:
            positions, pbc, transform = layout.positions, layout.pbc, None
    prepared = prepare_arrays(numbers, positions, cell, pbc, name=name, per_atom_arrays=per_atom_arrays, transform=transform, **settings.checks)
    return prepared, layout


def graph_edges(prepared: PreparedCrystal, settings: PreparationSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph edges ``graph_from_canonical`` would build for the prepared crystal.

    Its neighbour search is the one validation already ran (float64 canonical positions, the
    network's cutoff), reused whatever the network's dtype: a float32 network used to cost a
    second search of the float32-rounded positions, a large share of a worker's time.
    """
    return capped_edges(*prepared.pairs, len(prepared.form.positions), settings.checks["max_neighbors"])


# --- a background thread (prefetch=True) -----------------------------------------------------------


def prefetched(source: Iterator, depth: int) -> Generator:
    """Run ``source`` in a background thread, up to ``depth`` entries ahead of the consumer.

    Entries come out in order; an exception in ``source`` is raised at its place. Closing the
    returned generator stops the thread after the entry it is working on.
    """
    entries: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                entries.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for entry in source:
                if not put((True, entry)):
                    return
            put((False, None))
        except BaseException as exc:  # raised in the consumer, in order
            put((False, exc))

    thread = threading.Thread(target=work, name="e3relax-prepare", daemon=True)
    thread.start()
    try:
        while True:
            ok, entry = entries.get()
            if ok:
                yield entry
            elif entry is None:
                return
            else:
                raise entry
    finally:
        stop.set()
        thread.join(timeout=5.0)


# --- worker processes (num_workers > 0) ------------------------------------------------------------


def start_worker_pool(num_workers: int):
    """Worker processes for ``relax_many(num_workers=...)``.

    Forked where the platform allows (like torch's DataLoader): no re-import of the caller's
    script, no start-up cost. The workers run numpy, vesin and CPU torch with one thread and
    never touch CUDA, which is what makes forking a process with torch threads safe.
    Elsewhere spawned (then the caller's script needs the ``if __name__ == "__main__"`` guard).
    A worker that dies raises ``BrokenProcessPool`` instead of hanging.
    """
    # Imported here: a relaxer that never starts workers does not pay for them.
    import multiprocessing
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and os.name == "posix" and not _is_macos() else "spawn"
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork() in a process with threads (torch's); see above.
        warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks.*", category=DeprecationWarning)
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context(method), initializer=_worker_init)
        pool.submit(int).result()  # start the workers now, inside the filter
    return pool


def auto_num_workers(device, processes_per_host: int = 1) -> int:
    """How many preparation workers "auto" means for one relaxing process on ``device``.

    On CUDA the network waits for the host, so the process gets workers: its share of the
    usable cores (``processes_per_host`` relaxing processes share them, e.g. torchrun's
    ``LOCAL_WORLD_SIZE``), less ``AUTO_RESERVED_CORES`` for itself (one on a share under 8
    cores), at most ``AUTO_MAX_WORKERS``. On a CPU the forward pass needs the cores itself: none.
    """
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = cores // max(1, processes_per_host)
    reserved = AUTO_RESERVED_CORES if share >= 8 else 1
    return max(0, min(AUTO_MAX_WORKERS, share - reserved))


def pool_is_broken(pool) -> bool:
    """Whether a worker of ``pool`` died: the pool then refuses every task, so start another."""
    return bool(getattr(pool, "_broken", False))


def _is_macos() -> bool:
    return sys.platform == "darwin"


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def picklable_error(exc: Exception, fallback_message: str | None = None) -> Exception:
    """``exc`` if it survives the trip to another process, else a RuntimeError with its text
    (``fallback_message``, or its type and message). A calculator's own exception may fail to
    pickle in any way, hence the broad except."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(fallback_message if fallback_message is not None else f"{type(exc).__name__}: {exc}")


# --- preparing structures in the workers ------------------------------------------------------------


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


def named(error, name: Callable[[], str]):
    """``error`` with the ``UNNAMED`` placeholder that starts its message replaced by ``name()``
    (called only then: naming may take time); anything else as it is."""
    if isinstance(error, InvalidStructureError) and str(error).startswith(UNNAMED):
        return type(error)(name() + str(error)[len(UNNAMED) :])  # the same class (e.g. vacuum.ClusterError)
    return error


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


# --- judging predictions in the workers -------------------------------------------------------------


def submit_judging(pool, predictions: list, crystals: list, closest: list, relax_cell: bool, min_distance: float) -> list:
    """Send the judging of every prediction (``sanity.judge_batch``) to the worker processes;
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
    """The arguments of ``sanity.judge_batch`` for the structures ``group``, packed."""
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
    """In a worker: ``sanity.judge_batch`` for a packed group, as the relaxer runs it on a chunk
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
