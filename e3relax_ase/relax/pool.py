"""The worker processes behind ``relax_many(num_workers=N)``: starting the pool
(``start_worker_pool``), how many workers "auto" means (``auto_num_workers``), whether a worker
died (``pool_is_broken``), and exceptions that survive the trip back (``picklable_error``).

The workers validate each structure, find its canonical form and its graph edges
(``pool_prepare``), and later run the sanity checks and confidence of its prediction
(``pool_judge``); the main process keeps the Atoms objects and the network. What a worker runs
is module-level (the pool pickles functions by name), and these modules never import
``e3relax_ase.relax.relaxer``: a spawned worker imports only what the work needs, and the
relaxer can import them. Arrays travel packed, ``TASK_STRUCTURES`` structures to a task, as a
few concatenated arrays: cheap to send, where a list of small objects is not.
"""

from __future__ import annotations

import os
import pickle
import sys

import torch

TASK_STRUCTURES = 32  # structures per task sent to a worker process
# "auto" worker counts (CLI --workers): two cores stay for the relaxing process (its main
# thread, the pool's feeder and reader threads); on a 16-core GPU host 14 workers were faster
# end to end than 12 or 15 (an older benchmarks/README.md, in git history).
AUTO_MAX_WORKERS = 14
AUTO_RESERVED_CORES = 2  # on a share of 8 cores or more; 1 on smaller shares
AUTO_MIN_STRUCTURES = 256  # fewer structures than this are not worth starting workers for


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
