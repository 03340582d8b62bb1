"""Where the network runs and how much one forward pass may hold: the device and dtype a
relaxer resolves, its default edge budget from the free memory, and out-of-memory detection."""

from __future__ import annotations

import os

import torch

# Peak memory of a forward pass, per graph edge and feature channel, in units of the float size.
# Measured on CPU at F = 128 and 512: about 16 float32 / 12 float64 values; 24 leaves a margin.
BYTES_PER_EDGE_CHANNEL = 24
MEMORY_FRACTION = 0.5  # share of the free device memory the default edge budget may use
# Default structures per forward pass on CUDA. Unbounded, a long list became a few huge chunks,
# and the worker processes sat idle while the main process ran each one (forward, judging,
# writing back); 2,048 was the fastest of the sizes measured (benchmarks/README.md).
CUDA_BATCH_STRUCTURES = 2048


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_edge_budget(device: torch.device, dtype: torch.dtype, num_channels: int) -> int:
    """Graph edges one forward pass may hold: ``MEMORY_FRACTION`` of the free memory."""
    per_edge = BYTES_PER_EDGE_CHANNEL * torch.finfo(dtype).bits // 8 * num_channels
    return max(1000, int(MEMORY_FRACTION * available_memory(device) / per_edge))


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available (no CUDA); use device='cpu'")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float64 if device.type == "cpu" else torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dtype
