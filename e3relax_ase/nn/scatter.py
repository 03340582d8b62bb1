"""Segment sums and means over an index (atoms -> crystals, edges -> atoms)."""

from __future__ import annotations

import torch


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``values`` [n, ...] into ``size`` buckets given by ``index`` [n]."""
    out = values.new_zeros((size,) + values.shape[1:])
    return out.index_add_(0, index, values)


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of rows of ``values`` per bucket; empty buckets give zero."""
    total = scatter_sum(values, index, size)
    count = torch.bincount(index, minlength=size).clamp(min=1).to(values.dtype)
    return total / count.view((size,) + (1,) * (values.dim() - 1))
