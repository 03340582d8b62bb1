"""The periodic neighbour search (vesin) and its cap of ``max_neighbors`` per receiver: on
tensors (``neighbor_edges``, CPU or CUDA), or as the float64 CPU search (``periodic_pairs``)
capped in numpy for one crystal (``capped_edges``) or many (``capped_edges_many``), with the
same edges bit for bit. Edges are built from pairs closer than ``graph_radius(cutoff)``.

Conventions (edge direction, cell rows) are those of ``e3relax_ase.keys``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from e3relax_ase.keys import ISOLATION_MARGIN, SHELL_TOLERANCE


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
