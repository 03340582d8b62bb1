"""Thread limits where threads cost more than they give.

ASE's cell filters do 3x3 linear algebra (expm, logm, solves) at every optimiser step. Waking
a threaded BLAS for that costs far more than the arithmetic (a small EMT relaxation in
``training/distill/distill.py`` ran several times slower with it on 2 cores), so code that runs such
loops limits BLAS to one thread around them (``single_threaded_blas``); OpenMP threads of
torch (a calculator's own) are left alone there.

A relaxing process whose network runs on CUDA, beside worker processes, does only small
torch work on the CPU (joining arrays, pinned copies), yet each of those ops wakes torch's
OpenMP team, whose threads then spin on the cores the workers need (``torch_threads``).

A network running on a CPU that other work keeps busy suffers the same way: OpenMP waits for
its descheduled threads at every parallel region, so two threads on a loaded 2-core machine
are slower than one (``threads_for_a_busy_cpu``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def threads_for_a_busy_cpu(default: int) -> int:
    """torch's intra-op threads for a network on the CPU: one when the machine's load (1-minute
    average) shows other work keeping a core busy, else ``default`` (what it costs and saves:
    benchmarks/README.md, start-up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return default
    return 1 if cores > 1 and load >= cores - 0.5 else default


def single_threaded_blas():
    """A context manager limiting BLAS to one thread (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block, restored after it.

    Process-wide, as ``torch.set_num_threads`` is: torch code on other threads of the process
    runs with ``count`` too while the block lasts. With workers on a GPU host, one thread in
    the relaxing process cut its CPU per structure several fold and raised the end-to-end
    rate (an older benchmarks/README.md, in git history).
    """
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
