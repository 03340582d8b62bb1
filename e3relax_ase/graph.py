"""Periodic neighbour graphs and batching of many crystals into one graph.

Conventions (edge direction, cell rows) are those of ``e3relax_ase.keys``. The graph is a
data step: it is built once from the input structure, and the model recomputes edge vectors
from its current positions and cell in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from e3relax_ase.keys import SHELL_TOLERANCE


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

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "CrystalGraph":
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

    def pin_memory(self) -> "CrystalGraph":
        return CrystalGraph(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def cap_neighbors(
    dst: torch.Tensor, distances: torch.Tensor, n_nodes: int, max_neighbors: int, tolerance: float = SHELL_TOLERANCE
) -> torch.Tensor:
    """Keep at most ``max_neighbors`` nearest incoming edges per receiver, plus the whole last shell.

    An edge is kept when it is among the K nearest of its receiver, or when its distance is
    within ``tolerance`` of the K-th nearest distance. Keeping the whole K-th shell (instead of
    cutting it by sort order) makes the graph of a symmetric crystal symmetric and independent
    of the order in which atoms are written.

    Args:
        dst: [n_edges] receiver index of each edge.
        distances: [n_edges] edge lengths in Å.
        n_nodes: number of receivers.
        max_neighbors: K.
        tolerance: Å; neighbours this close to the K-th distance belong to the K-th shell.

    Returns:
        [n_edges] bool mask of the edges to keep.
    """
    n_edges = dst.shape[0]
    if n_edges == 0:
        return torch.ones(0, dtype=torch.bool, device=dst.device)
    # Sort by receiver, then distance (two stable sorts), to rank each edge within its receiver.
    order = torch.argsort(distances, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    sorted_dst = dst[order]
    counts = torch.bincount(sorted_dst, minlength=n_nodes)
    first = torch.cumsum(counts, 0) - counts  # [n_nodes] position of each receiver's first edge
    rank = torch.arange(n_edges, device=dst.device) - first[sorted_dst]
    # Distance of the K-th nearest neighbour of each receiver (inf where fewer than K exist).
    kth = torch.full((n_nodes,), float("inf"), dtype=distances.dtype, device=dst.device)
    at_k = rank == max_neighbors - 1
    kth[sorted_dst[at_k]] = distances[order][at_k]
    keep_sorted = (rank < max_neighbors) | (distances[order] <= kth[sorted_dst] + tolerance)
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def neighbor_edges(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    max_neighbors: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Periodic neighbour edges of one crystal (vesin-torch; CPU or CUDA tensors).

    Args:
        positions: [n_atoms, 3] Å.
        cell: [3, 3] rows are lattice vectors, Å.
        pbc: [3] bool.
        cutoff: Å.
        max_neighbors: K, see ``cap_neighbors``.

    Returns:
        (edge_src [n_edges], edge_dst [n_edges], edge_shift [n_edges, 3] float), sorted by
        receiver then distance.
    """
    import vesin_torch

    calculator = vesin_torch.NeighborList(cutoff=float(cutoff), full_list=True)
    positions64 = positions.detach().to(torch.float64)
    cell64 = cell.detach().to(torch.float64)
    pbc = pbc.to(device=positions.device, dtype=torch.bool)
    dst, src, shift, distances = calculator.compute(positions64, cell64, pbc, "ijSd")
    # vesin returns pairs (i, j, S) with vector r_j + S @ cell - r_i: i receives, j sends.
    not_self = (src != dst) | (shift != 0).any(dim=1)
    dst, src, shift, distances = dst[not_self], src[not_self], shift[not_self], distances[not_self]
    keep = cap_neighbors(dst, distances, positions.shape[0], max_neighbors)
    dst, src, shift, distances = dst[keep], src[keep], shift[keep], distances[keep]
    order = torch.argsort(distances, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    return src[order].long(), dst[order].long(), shift[order].to(positions.dtype)


def build_graph(
    numbers: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    cells: Sequence[torch.Tensor],
    pbcs: Sequence[torch.Tensor],
    cutoff: float,
    max_neighbors: int,
) -> CrystalGraph:
    """Batch several crystals into one graph.

    Args:
        numbers: per crystal, [n_atoms] atomic numbers.
        positions: per crystal, [n_atoms, 3] Å.
        cells: per crystal, [3, 3] rows are lattice vectors.
        pbcs: per crystal, [3] bool.
        cutoff: Å.
        max_neighbors: K.

    Returns:
        A ``CrystalGraph`` on the device and dtype of the first crystal's positions.
    """
    if len(positions) == 0:
        raise ValueError("build_graph needs at least one crystal")
    device = positions[0].device
    dtype = positions[0].dtype
    srcs, dsts, shifts, batch = [], [], [], []
    offset = 0
    for index, (pos, cell, pbc) in enumerate(zip(positions, cells, pbcs)):
        src, dst, shift = neighbor_edges(pos, cell, pbc, cutoff, max_neighbors)
        srcs.append(src + offset)
        dsts.append(dst + offset)
        shifts.append(shift)
        batch.append(torch.full((pos.shape[0],), index, dtype=torch.long, device=device))
        offset += pos.shape[0]
    return CrystalGraph(
        numbers=torch.cat([torch.as_tensor(n, device=device).long() for n in numbers]),
        positions=torch.cat([p.to(dtype) for p in positions]),
        cell=torch.stack([c.to(dtype) for c in cells]),
        pbc=torch.stack([torch.as_tensor(p, device=device).bool() for p in pbcs]),
        batch=torch.cat(batch),
        n_atoms=torch.tensor([p.shape[0] for p in positions], dtype=torch.long, device=device),
        edge_src=torch.cat(srcs),
        edge_dst=torch.cat(dsts),
        edge_shift=torch.cat(shifts),
    )


def edge_vectors(graph: CrystalGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Edge vectors from the current positions and cell (differentiable).

    Returns:
        [n_edges, 3] positions[src] + shift @ cell[crystal] - positions[dst], Å.
    """
    cell_of_edge = cell[graph.batch[graph.edge_src]]  # [n_edges, 3, 3]
    translation = torch.einsum("ek,ekx->ex", graph.edge_shift, cell_of_edge)
    return positions[graph.edge_src] + translation - positions[graph.edge_dst]
