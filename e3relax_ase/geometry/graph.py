"""Periodic neighbour graphs and batching of many crystals into one graph.

Conventions (edge direction, cell rows) are those of ``e3relax_ase.keys``. The graph is a
data step: it is built once from the input structure, and the model recomputes edge vectors
from its current positions and cell in every layer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from e3relax_ase.keys import ISOLATION_MARGIN, SHELL_TOLERANCE


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


def cap_neighbors(dst: torch.Tensor, distances: torch.Tensor, n_nodes: int, max_neighbors: int, tolerance: float = SHELL_TOLERANCE) -> torch.Tensor:
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
    positions64 = positions.detach().to(torch.float64)
    cell64 = cell.detach().to(torch.float64)
    pbc = pbc.to(device=positions.device, dtype=torch.bool)
    dst, src, shift, distances = _neighbor_list(cutoff, positions.device).compute(positions64, cell64, pbc, "ijSd")
    # vesin returns pairs (i, j, S) with vector r_j + S @ cell - r_i: i receives, j sends.
    kept = ((src != dst) | (shift != 0).any(dim=1)) & (distances < graph_radius(cutoff))  # no true self pair
    dst, src, shift, distances = dst[kept], src[kept], shift[kept], distances[kept]
    keep = cap_neighbors(dst, distances, positions.shape[0], max_neighbors)
    dst, src, shift, distances = dst[keep], src[keep], shift[keep], distances[keep]
    order = torch.argsort(distances, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    return src[order].long(), dst[order].long(), shift[order].to(positions.dtype)


def graph_radius(cutoff: float) -> float:
    """Pairs closer than this are edges: the cutoff less ``keys.ISOLATION_MARGIN``.

    The graph is built once from the input, and the network strains it: an edge just inside
    the cutoff in the input can sit well inside it a layer later and carry weight, while one
    just outside is never seen. Whether an input distance of exactly the cutoff (a 6 Å cell
    edge) counts was then decided by rounding, and the same crystal written in another basis
    relaxed differently (by 2e-6 Å in the fuzz's case). Deciding at cutoff - 0.01 Å, a length no
    natural input sits on within rounding, keeps that decision the same however the crystal
    is written; the edges given up weigh less than 2e-7 in the input.
    """
    return float(cutoff) - ISOLATION_MARGIN


def _neighbor_list(cutoff: float, device: torch.device | str = "cpu"):
    """A vesin-torch calculator for ``cutoff``, reused within a thread and process.

    A calculator holds no state between ``compute`` calls that affects the result (it is
    created with the same options as a fresh one, and ``compute`` returns copies), so reusing
    it only saves its construction; one per thread keeps concurrent callers apart, and one per
    device keeps any buffers a GPU search allocates on that device.
    """
    import vesin_torch

    key = (os.getpid(), float(cutoff), str(device))
    cache = getattr(_CALCULATORS, "cache", None)
    if cache is None:
        cache = _CALCULATORS.cache = {}
    calculator = cache.get(key)
    if calculator is None:
        if len(cache) > 16:  # many different cutoffs: do not grow without bound
            cache.clear()
        calculator = cache[key] = vesin_torch.NeighborList(cutoff=float(cutoff), full_list=True)
    return calculator


_CALCULATORS = threading.local()


_NUMPY_TYPES = {torch.float64: np.float64, torch.bool: np.bool_}


def _host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a CPU tensor of ``dtype``; a numpy array of that type is shared, not copied
    (per crystal, the torch conversions cost a noticeable share of its neighbour search)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", dtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=_NUMPY_TYPES[dtype]))


def periodic_pairs(positions, cell, pbc, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within ``graph_radius(cutoff)`` of one crystal, searched on the CPU in float64.

    The search ``neighbor_edges`` does before capping (full list, periodic images included,
    true self pair excluded), with the same vesin call on the same float64 numbers, so the
    pairs come in the same order with the same distances.

    Args:
        positions: [n_atoms, 3] Å (numpy or torch; taken as float64).
        cell: [3, 3] rows are lattice vectors, Å.
        pbc: [3] bool.
        cutoff: Å.

    Returns:
        (receiver i, sender j, shift [n, 3] int, distance) numpy arrays in vesin's order.
    """
    positions, cell, pbc = _host_tensor(positions, torch.float64), _host_tensor(cell, torch.float64), _host_tensor(pbc, torch.bool)
    dst, src, shift, distances = _neighbor_list(cutoff).compute(positions, cell, pbc, "ijSd")
    dst, src, shift, distances = dst.numpy(), src.numpy(), shift.numpy(), distances.numpy()
    kept = ((src != dst) | (shift != 0).any(axis=1)) & (distances < graph_radius(cutoff))  # no true self pair
    if kept.all():
        return dst, src, shift, distances
    return dst[kept], src[kept], shift[kept], distances[kept]


def capped_edges(
    dst: np.ndarray, src: np.ndarray, shift: np.ndarray, distances: np.ndarray, n_atoms: int, max_neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``neighbor_edges``'s cap and ordering, applied to pairs from ``periodic_pairs``, in numpy.

    The rule of ``cap_neighbors`` (same comparisons in float64) and the order of
    ``neighbor_edges`` (by receiver, then distance, then search order: stable sorts give a
    unique permutation), so the edges are those of ``neighbor_edges`` for the same search,
    bit for bit (tests/relax/test_pipeline_speed_equivalence.py); much faster on small cells,
    where torch's per-op overhead dominates.

    Returns:
        (edge_src int64, edge_dst int64, edge_shift int) numpy arrays, local atom indices.
    """
    order = np.argsort(distances, kind="stable")
    order = order[np.argsort(dst[order], kind="stable")]
    sorted_dst = dst[order]
    counts = np.bincount(sorted_dst, minlength=n_atoms)
    if len(dst) and int(counts.max()) > max_neighbors:
        # cap_neighbors's rule, on the order computed above (sorted by receiver, distance,
        # search order): the kept edges, in that order, are neighbor_edges's final order.
        first = np.cumsum(counts) - counts
        rank = np.arange(len(dst)) - first[sorted_dst]
        sorted_distances = distances[order]
        kth = np.full(n_atoms, np.inf, dtype=distances.dtype)
        at_k = rank == max_neighbors - 1
        kth[sorted_dst[at_k]] = sorted_distances[at_k]
        order = order[(rank < max_neighbors) | (sorted_distances <= kth[sorted_dst] + SHELL_TOLERANCE)]
    return src[order].astype(np.int64), dst[order].astype(np.int64), shift[order]


def capped_edges_many(pairs: Sequence[tuple], sizes: Sequence[int], max_neighbors: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``capped_edges`` of many crystals in one pass over their joined pairs.

    The pairs are joined with each crystal's receivers offset by its atoms before it, so one
    stable sort by (receiver, distance) orders every crystal as ``capped_edges`` orders it
    alone (its pairs keep their search order among ties), and the cap's comparisons are the
    same float64 comparisons: the same edges in the same order, bit for bit
    (tests/geometry/test_graph.py). Capped alone, a crystal's time is nearly all per-call overhead,
    which one pass shares.

    Args:
        pairs: per crystal, ``periodic_pairs``'s (receiver, sender, shift, distance).
        sizes: atoms of each crystal.
        max_neighbors: K.

    Returns:
        Per crystal, (edge_src int64, edge_dst int64, edge_shift int), local atom indices.
    """
    if not len(pairs):
        return []
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    counts = np.array([len(p[0]) for p in pairs], dtype=np.int64)
    dst = np.concatenate([p[0] for p in pairs]).astype(np.int64) + np.repeat(offsets[:-1], counts)
    src = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    shift = np.concatenate([np.asarray(p[2]).reshape(-1, 3) for p in pairs])
    distances = np.concatenate([p[3] for p in pairs])
    order = np.argsort(distances, kind="stable")
    order = order[np.argsort(dst[order], kind="stable")]
    sorted_dst = dst[order]
    per_atom = np.bincount(sorted_dst, minlength=int(offsets[-1]))
    if len(dst) and int(per_atom.max()) > max_neighbors:
        first = np.cumsum(per_atom) - per_atom
        rank = np.arange(len(dst)) - first[sorted_dst]
        sorted_distances = distances[order]
        kth = np.full(int(offsets[-1]), np.inf, dtype=distances.dtype)
        at_k = rank == max_neighbors - 1
        kth[sorted_dst[at_k]] = sorted_distances[at_k]
        order = order[(rank < max_neighbors) | (sorted_distances <= kth[sorted_dst] + SHELL_TOLERANCE)]
    kept_dst = dst[order]
    bounds = np.searchsorted(kept_dst, offsets).tolist()  # each crystal's edges are one run
    src, shift = src[order], shift[order]
    out = []
    for k in range(len(pairs)):
        a, b = bounds[k], bounds[k + 1]
        out.append((src[a:b], kept_dst[a:b] - offsets[k], shift[a:b]))
    return out


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
