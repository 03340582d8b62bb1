"""Batching of many crystals into one graph (``CrystalGraph``), from their neighbour search
(``build_graph``) or from edges already known (``graph_from_edges``), and the edge vectors the
model recomputes from them.

Conventions (edge direction, cell rows) are those of ``e3relax_ase.keys``. The graph is a
data step: it is built once from the input structure, and the model recomputes edge vectors
from its current positions and cell in every layer. The neighbour search and its cap are
``neighbors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from e3relax_ase.geometry.neighbors import capped_edges, neighbor_edges, periodic_pairs


@dataclass
class CrystalGraph:
    """A batch of crystals as one graph (a single crystal is a batch of one)."""

    numbers: torch.Tensor  # [n_atoms] int64 | atomic numbers
    positions: torch.Tensor  # [n_atoms, 3] float | Å
    cell: torch.Tensor  # [n_graphs, 3, 3] float | rows are lattice vectors, Å
    pbc: torch.Tensor  # [n_graphs, 3] bool
    batch: torch.Tensor  # [n_atoms] int64 | crystal index of each atom
    n_atoms: torch.Tensor  # [n_graphs] int64
    edge_src: torch.Tensor  # [n_edges] int64 | sender j
    edge_dst: torch.Tensor  # [n_edges] int64 | receiver i
    edge_shift: torch.Tensor  # [n_edges, 3] float | lattice translation k of the sender

    @property
    def n_graphs(self) -> int:
        return self.cell.shape[0]

    @property
    def n_edges(self) -> int:
        return self.edge_src.shape[0]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> CrystalGraph:
        """Move to a device; ``dtype`` applies to the floating-point fields only."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dtype is not None and value.is_floating_point():
                value = value.to(device=device, dtype=dtype, non_blocking=non_blocking)
            else:
                value = value.to(device=device, non_blocking=non_blocking)
            moved[f.name] = value
        return CrystalGraph(**moved)

    def pin_memory(self) -> CrystalGraph:
        return CrystalGraph(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


# On a CUDA device, crystals at least this large are searched on the GPU (build_graph).
GPU_SEARCH_ATOMS = 1000


def graph_from_edges(
    numbers: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    pbcs: Sequence[np.ndarray],
    edges: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    dtype: torch.dtype,
) -> CrystalGraph:
    """Batch crystals whose edges are already known (``capped_edges``) into one CPU graph.

    The same graph ``build_graph`` makes from CPU tensors of ``dtype`` (one concatenation per
    field instead of one tensor per crystal); move it to a device in one go with
    ``graph.pin_memory().to(device, non_blocking=True)``.
    """
    if len(positions) == 0:
        raise ValueError("graph_from_edges needs at least one crystal")
    n_atoms = np.array([len(p) for p in positions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    n_edges = np.array([len(e[0]) for e in edges], dtype=np.int64)
    edge_offsets = np.repeat(offsets, n_edges)
    return CrystalGraph(
        numbers=torch.from_numpy(np.concatenate(numbers).astype(np.int64, copy=False)),
        positions=torch.from_numpy(np.concatenate(positions).astype(np.float64, copy=False)).to(dtype),
        # np.array of the list: np.stack's array, without its per-array Python work
        cell=torch.from_numpy(np.array(cells, dtype=np.float64)).to(dtype),
        pbc=torch.from_numpy(np.array(pbcs, dtype=bool)),
        batch=torch.from_numpy(np.repeat(np.arange(len(positions), dtype=np.int64), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        edge_src=torch.from_numpy(np.concatenate([e[0] for e in edges]) + edge_offsets),
        edge_dst=torch.from_numpy(np.concatenate([e[1] for e in edges]) + edge_offsets),
        edge_shift=torch.from_numpy(np.concatenate([np.asarray(e[2]).reshape(-1, 3) for e in edges])).to(dtype),
    )


def build_graph(
    numbers: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    cells: Sequence[torch.Tensor],
    pbcs: Sequence[torch.Tensor],
    cutoff: float,
    max_neighbors: int,
    dtype: torch.dtype | None = None,
) -> CrystalGraph:
    """Batch several crystals into one graph.

    The neighbour search runs on the CPU (one vesin call per crystal, on the float64 values
    of the given positions, as ``neighbor_edges``), and the edges reach the crystals' device
    in one transfer: per-crystal searches on CUDA cost a few ms of launches each. A crystal of
    ``GPU_SEARCH_ATOMS`` atoms or more on a CUDA device is searched there instead
    (``neighbor_edges``): its CPU search and cap grow with its atoms, while the CUDA search
    barely grows. Both give the same edges, sorted the same way (receiver, then
    distance), up to the order of exact distance ties.

    Args:
        numbers: per crystal, [n_atoms] atomic numbers.
        positions: per crystal, [n_atoms, 3] Å.
        cells: per crystal, [3, 3] rows are lattice vectors.
        pbcs: per crystal, [3] bool.
        cutoff: Å.
        max_neighbors: K.
        dtype: the graph's floating-point dtype (default: the positions'). Searching float64
            positions for a float32 graph finds the edges of the exact crystal, not of its
            float32 rounding (``predict.graph_from_canonical`` does this).

    Returns:
        A ``CrystalGraph`` on the device of the first crystal's positions.
    """
    if len(positions) == 0:
        raise ValueError("build_graph needs at least one crystal")
    device = positions[0].device
    dtype = dtype or positions[0].dtype
    # Each crystal searched on the float64 values of its own positions, as neighbor_edges does.
    host_positions = torch.cat([p.detach().to(torch.float64) for p in positions]).cpu().numpy()
    host_cells = torch.stack([c.detach().to(torch.float64) for c in cells]).cpu().numpy()
    host_pbcs = torch.stack([torch.as_tensor(p).to("cpu").bool() for p in pbcs]).numpy()
    sizes = [p.shape[0] for p in positions]
    # Runs of consecutive crystals searched on the host, joined into one transfer each; the
    # large ones on CUDA go straight to the device.
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # ([2, n] edges, [n, 3] shifts)
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    shifts: list[np.ndarray] = []

    def flush_host():
        if srcs:
            edges = torch.from_numpy(np.stack([np.concatenate(srcs), np.concatenate(dsts)]))
            shift = torch.from_numpy(np.concatenate(shifts).astype(np.float64, copy=False))
            if device.type == "cuda":
                edges, shift = edges.pin_memory(), shift.pin_memory()
            parts.append((edges.to(device, non_blocking=True), shift.to(device, non_blocking=True)))
            srcs.clear(), dsts.clear(), shifts.clear()

    offset = 0
    for index, size in enumerate(sizes):
        if _search_on_device(device, size):
            flush_host()
            src, dst, shift = neighbor_edges(positions[index], cells[index], torch.as_tensor(pbcs[index]), cutoff, max_neighbors)
            parts.append((torch.stack([src + offset, dst + offset]), shift.to(torch.float64)))
        else:
            pairs = periodic_pairs(host_positions[offset : offset + size], host_cells[index], host_pbcs[index], cutoff)
            src_host, dst_host, shift_host = capped_edges(*pairs, size, max_neighbors)
            srcs.append(src_host + offset)
            dsts.append(dst_host + offset)
            shifts.append(shift_host.reshape(-1, 3))
        offset += size
    flush_host()
    edges = torch.cat([e for e, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]
    shift = torch.cat([s for _, s in parts]) if len(parts) > 1 else parts[0][1]
    batch = torch.from_numpy(np.repeat(np.arange(len(sizes), dtype=np.int64), sizes))
    if device.type == "cuda":
        batch = batch.pin_memory()
    return CrystalGraph(
        numbers=torch.cat([torch.as_tensor(n, device=device).long() for n in numbers]),
        positions=torch.cat([p.to(dtype) for p in positions]),
        cell=torch.stack([c.to(dtype) for c in cells]),
        pbc=torch.stack([torch.as_tensor(p, device=device).bool() for p in pbcs]),
        batch=batch.to(device, non_blocking=True),
        n_atoms=torch.tensor(sizes, dtype=torch.long, device=device),
        edge_src=edges[0],
        edge_dst=edges[1],
        edge_shift=shift.to(device=device, dtype=dtype, non_blocking=True),
    )


def _search_on_device(device: torch.device, n_atoms: int) -> bool:
    """Whether build_graph searches a crystal of ``n_atoms`` on ``device`` rather than the host."""
    return device.type == "cuda" and n_atoms >= GPU_SEARCH_ATOMS


def edge_vectors(graph: CrystalGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Edge vectors from the current positions and cell (differentiable).

    Returns:
        [n_edges, 3] positions[src] + shift @ cell[crystal] - positions[dst], Å.
    """
    cell_of_edge = cell[graph.batch[graph.edge_src]]  # [n_edges, 3, 3]
    # Elementwise rather than einsum: autocast leaves it in the positions' precision (a bfloat16
    # product of a 10 Å cell would misplace images by ~0.04 Å).
    translation = (graph.edge_shift.unsqueeze(-1) * cell_of_edge).sum(dim=-2)
    return positions[graph.edge_src] + translation - positions[graph.edge_dst]
