"""Thread limits for small linear algebra.

ASE's cell filters do 3x3 linear algebra (expm, logm, solves) at every optimiser step. Waking
a threaded BLAS for that costs far more than the arithmetic (measured in
``training/distill.py``: 12 s vs 1.5 s for a 4-atom EMT relaxation on 2 cores), so code that
runs such loops limits BLAS to one thread around them. OpenMP threads of torch (a calculator's
own) are left alone.
"""

from __future__ import annotations

import contextlib


def single_threaded_blas():
    """A context manager limiting BLAS to one thread (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
