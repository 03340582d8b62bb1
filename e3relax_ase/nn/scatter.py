"""Segment sums and means over an index (atoms -> crystals, edges -> atoms)."""

from __future__ import annotations

import torch


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``values`` [n, ...] into ``size`` buckets given by ``index`` [n]."""
    # Sums accumulate in at least float32: under bfloat16 autocast the summands stay bfloat16,
    # but a bfloat16 running sum of ~40 neighbour messages loses most of its 8 significant bits.
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = values.new_zeros((size,) + values.shape[1:], dtype=dtype)
    return out.index_add_(0, index, values.to(dtype))


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of rows of ``values`` per bucket; empty buckets give zero."""
    total = scatter_sum(values, index, size)
    # Counted with index_add_, not torch.bincount: on CUDA bincount reads the largest index back
    # to the host, a sync that stops the CPU from queueing the rest of the forward pass (the
    # relaxer overlaps that pass with its host work). Counted in the sum's dtype (at least
    # float32: a bfloat16 count would stop at 256), exact as bincount's, then cast as before.
    ones = torch.ones_like(index, dtype=total.dtype)
    count = total.new_zeros(size).index_add_(0, index, ones).clamp(min=1).to(values.dtype)
    return total / count.view((size,) + (1,) * (values.dim() - 1))
