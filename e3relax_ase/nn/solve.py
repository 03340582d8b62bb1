"""Batched linear solves that never stop the CPU to look at the result."""

from __future__ import annotations

import torch


def solve_unchecked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` without its singularity check: the same factorisation and
    the same numbers, but a singular ``a`` gives inf/NaN instead of an exception.

    Why: on CUDA the check copies the factorisation's status to the host, a sync in every
    layer that stops the CPU from queueing the rest of the forward pass. A singular cell
    cannot reach the network (validation refuses it); a predicted one that collapses gives
    non-finite positions, which the sanity checks flag (the input geometry is then kept).
    """
    return torch.linalg.solve_ex(a, b, check_errors=False)[0]
