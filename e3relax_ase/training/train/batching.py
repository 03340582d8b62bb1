"""An epoch's batches, planned on the host once and gathered on the device without a sync.

Batches are filled by a budget of atoms and edges rather than a count of crystals: the cost
of a step follows atoms and edges, and crystals of 2 to 64 atoms would otherwise make steps
of very different cost. The host knows every pair's atom and edge counts, so it packs the
epoch, computes every index a batch needs (which atoms and edges it takes, where each pair's
atoms start inside its batch) as a few flat arrays, and sends them to the device in one copy.
A step then only slices those arrays at offsets the host already knows and gathers from the
prepared pairs: no value is read back from the device between steps, so the host queues
steps ahead of the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from e3relax_ase.geometry.graph import CrystalGraph
from e3relax_ase.training.train.dataset import PreparedPairs


@dataclass(frozen=True)
class Budget:
    """Limits of one batch; a pair larger than the budget gets a batch of its own."""

    max_atoms: int = 0  # 0: no limit
    max_edges: int = 0  # 0: no limit
    max_graphs: int = 0  # 0: no limit


def pack(atom_counts: np.ndarray, edge_counts: np.ndarray, budget: Budget) -> np.ndarray:
    """Greedy packing of pairs, in the given order, into consecutive batches.

    Returns:
        [n_batches + 1] positions in the order where each batch starts (and the end).
    """
    limits = [(budget.max_atoms, atom_counts), (budget.max_edges, edge_counts), (budget.max_graphs, np.ones_like(atom_counts))]
    limits = [(limit, counts) for limit, counts in limits if limit > 0]
    starts = [0]
    totals = [0] * len(limits)
    for k in range(len(atom_counts)):
        if k > starts[-1] and any(total + counts[k] > limit for total, (limit, counts) in zip(totals, limits)):
            starts.append(k)
            totals = [0] * len(limits)
        totals = [total + counts[k] for total, (_, counts) in zip(totals, limits)]
    if len(atom_counts):
        starts.append(len(atom_counts))
    return np.asarray(starts, dtype=np.int64)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + count) for each pair, without a Python loop."""
    begin = np.cumsum(counts) - counts
    return np.repeat(starts - begin, counts) + np.arange(int(counts.sum()))


def pair_sizes(data: PreparedPairs) -> tuple[np.ndarray, np.ndarray]:
    """(atoms [n], edges [n]) of every pair, on the host."""
    return np.diff(data.atom_offsets.cpu().numpy()), np.diff(data.edge_offsets.cpu().numpy())


def shard(order: np.ndarray, atom_counts: np.ndarray, edge_counts: np.ndarray, budget: Budget, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's batches of an epoch: global batches packed with ``world_size`` times the
    budget, each split into ``world_size`` consecutive parts of equal pair counts.

    One process packs the whole order exactly as ``world_size`` processes do together, so a
    DDP step sees the pairs of one global batch (``order`` and the counts are in the same
    order). Every rank needs a non-empty part in every step (an extra or missing step waits
    forever in DDP's all-reduce): the order first drops its last ``len % world_size`` pairs
    (fewer than ``world_size``; others each epoch, since the order changes), and a last global
    batch with fewer pairs than ranks is dropped.

    Returns:
        (order, pair_bounds) of this rank's batches.
    """
    keep = len(order) - len(order) % world_size
    order, atom_counts, edge_counts = order[:keep], atom_counts[:keep], edge_counts[:keep]
    scaled = Budget(*(limit * world_size for limit in (budget.max_atoms, budget.max_edges, budget.max_graphs)))
    bounds = pack(atom_counts, edge_counts, scaled)
    pieces = []
    for b in range(len(bounds) - 1):
        members = order[bounds[b] : bounds[b + 1]]
        if len(members) < world_size:
            continue
        pieces.append(np.array_split(members, world_size)[rank])
    sizes = [len(piece) for piece in pieces]
    local_order = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return local_order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class EpochBatches:
    """The batches of one epoch over ``data`` in ``order`` (module docstring).

    ``len(batches)`` batches; ``batches.collate(b)`` returns (graph, positions_target,
    cell_target, source) of batch b, with ``source`` the file index of each of its pairs.
    """

    def __init__(self, data: PreparedPairs, order: np.ndarray, budget: Budget | None = None, pair_bounds: np.ndarray | None = None):
        """Pack ``order`` by ``budget``, or take the batches ``pair_bounds`` already packed."""
        self.data = data
        atom_offsets = data.atom_offsets.cpu().numpy()
        edge_offsets = data.edge_offsets.cpu().numpy()
        order = np.asarray(order, dtype=np.int64)
        atoms = np.diff(atom_offsets)[order]
        edges = np.diff(edge_offsets)[order]
        self.pair_bounds = pack(atoms, edges, budget or Budget()) if pair_bounds is None else np.asarray(pair_bounds, dtype=np.int64)
        # Where each pair's atoms start in its batch, and its crystal index in the batch.
        batch_of_pair = np.repeat(np.arange(len(self.pair_bounds) - 1), np.diff(self.pair_bounds))
        atom_start = np.cumsum(atoms) - atoms
        first_pair = self.pair_bounds[batch_of_pair]
        start_in_batch = atom_start - atom_start[first_pair] if len(order) else atom_start
        graph_in_batch = np.arange(len(order)) - first_pair
        atom_cumulative = np.concatenate([[0], np.cumsum(atoms)])
        edge_cumulative = np.concatenate([[0], np.cumsum(edges)])
        self.atom_bounds = atom_cumulative[self.pair_bounds].tolist()
        self.edge_bounds = edge_cumulative[self.pair_bounds].tolist()
        self.pair_bounds = self.pair_bounds.tolist()
        device = data.numbers.device
        arrays = {
            "pairs": order,
            "n_atoms": atoms,
            "atoms": _ranges(atom_offsets[order], atoms),
            "edges": _ranges(edge_offsets[order], edges),
            "edge_base": np.repeat(start_in_batch, edges),
            "batch": np.repeat(graph_in_batch, atoms),
        }
        pinned = device.type == "cuda"
        self._index = {}
        for name, values in arrays.items():
            tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.int64))
            self._index[name] = tensor.pin_memory().to(device, non_blocking=True) if pinned else tensor.to(device)

    def __len__(self) -> int:
        return len(self.pair_bounds) - 1

    def n_pairs(self, b: int) -> int:
        return self.pair_bounds[b + 1] - self.pair_bounds[b]

    def n_atoms(self, b: int) -> int:
        return self.atom_bounds[b + 1] - self.atom_bounds[b]

    def collate(self, b: int) -> tuple[CrystalGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        data, index = self.data, self._index
        p0, p1 = self.pair_bounds[b], self.pair_bounds[b + 1]
        a0, a1 = self.atom_bounds[b], self.atom_bounds[b + 1]
        e0, e1 = self.edge_bounds[b], self.edge_bounds[b + 1]
        pairs, atoms, edges = index["pairs"][p0:p1], index["atoms"][a0:a1], index["edges"][e0:e1]
        edge_base = index["edge_base"][e0:e1]
        graph = CrystalGraph(
            numbers=data.numbers[atoms],
            positions=data.positions[atoms],
            cell=data.cell[pairs],
            pbc=data.pbc[pairs],
            batch=index["batch"][a0:a1],
            n_atoms=index["n_atoms"][p0:p1],
            edge_src=data.edge_src[edges] + edge_base,
            edge_dst=data.edge_dst[edges] + edge_base,
            edge_shift=data.edge_shift[edges],
        )
        return graph, data.positions_target[atoms], data.cell_target[pairs], data.source[pairs]
