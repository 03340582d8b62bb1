"""Keep freed heap memory in the process, so a CPU forward pass stops paying page faults.

A forward pass on the CPU allocates and frees hundreds of tensors of 0.1 to a few MB. glibc's
malloc, by default, serves the larger ones with fresh ``mmap`` pages and hands the top of the
heap back to the kernel whenever more than twice its (self-adjusting) mmap threshold is free.
So every forward pass re-faults and re-zeroes its working set: thousands of minor page
faults per ``relax`` call on a small cell, a sizeable share of its time on a CPU
(``python benchmarks/bench_cpu_latency.py --compare-heap`` measures both, with and without).

:func:`keep_freed_heap` fixes glibc's two thresholds instead: allocations up to
``MMAP_THRESHOLD`` come from the heap, and the heap keeps up to ``TRIM_THRESHOLD`` of free
memory at its top. That is what glibc's own rule converges to for a steady workload, without
its trimming; it only changes where memory comes from, never what is computed (torch aligns
every CPU tensor to 64 bytes either way), so results are bitwise the same
(tests/relax/test_heap.py). The cost is memory the process keeps after a pass: at most
``TRIM_THRESHOLD`` at the heap's top, plus whatever fragmentation leaves.

``OneShotRelaxer`` on the CPU calls it once per process. Set ``E3RELAX_KEEP_HEAP=0`` to leave
malloc alone. Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

ENV_VARIABLE = "E3RELAX_KEEP_HEAP"  # "0" leaves malloc's defaults alone
MMAP_THRESHOLD = 32 << 20  # bytes | glibc's ceiling for its own dynamic threshold (64-bit)
TRIM_THRESHOLD = 64 << 20  # bytes | twice the mmap threshold, as glibc's dynamic rule pairs them
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet in this process


def keep_freed_heap() -> bool:
    """Once per process: fix glibc's mmap and trim thresholds (module docstring).

    Returns:
        True when the thresholds are set (now or by an earlier call), False when they are not
        (not glibc, ``E3RELAX_KEEP_HEAP=0``, or malloc refused a value).
    """
    global _applied
    if _applied is not None:
        return _applied
    with _lock:
        if _applied is None:
            _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if os.environ.get(ENV_VARIABLE, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        _ = libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: fixing the trim threshold alone would switch off glibc's dynamic
    # mmap threshold too and leave every tensor over 128 kB to fresh mmap pages (slower still).
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
