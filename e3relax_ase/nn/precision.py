"""Arithmetic precision of the network's channel mixing: float32, TF32 or bfloat16.

The network's parameters and its geometry (positions, cell, edge vectors, the structure
updates) stay in the relaxer's dtype whatever is chosen here. What changes is how the dense
channel-mixing products (``nn.Linear`` and the MLPs, which hold nearly all the FLOPs) are
computed on the GPU:

- ``"float32"``: exact float32 products (the default; what the tests pin).
- ``"tf32"``: float32 products on the tensor cores with 10-bit mantissas (CUDA only; on a
  CPU it changes nothing).
- ``"bf16"``: ``torch.autocast`` to bfloat16 for the products; sums over neighbours still
  accumulate in float32 (``nn.scatter``) and the geometry is written with elementwise ops
  that autocast leaves alone (``model.InteractionLayer.lattice_step``).

docs/relaxer.md has the measured deviation of each from float32 (in Å) and what each buys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("float32", "tf32", "bf16")


def check_precision(precision: str, dtype: torch.dtype) -> str:
    """``precision`` if it names one of ``PRECISIONS`` and suits a network in ``dtype``.

    Raises:
        ValueError: an unknown name, or a reduced precision asked of a float64 network (whose
            point is exactness).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "float32" and dtype != torch.float32:
        raise ValueError(f"precision={precision!r} needs dtype float32 (the network is {str(dtype).replace('torch.', '')})")
    return precision


@contextmanager
def matmul_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the block's network calls on ``device`` in ``precision`` (see the module docstring).

    TF32 is a process-wide switch in PyTorch; it is set for the block and restored after it,
    so other code in the process keeps its own setting outside the block.
    """
    device = torch.device(device)
    if precision == "float32" or (precision == "tf32" and device.type != "cuda"):
        yield
    elif precision == "tf32":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
    elif precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
