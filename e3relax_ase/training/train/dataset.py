"""Training pairs prepared once for fast batching: canonical inputs, aligned targets, edges.

Preparation does, per pair and once: the canonical form of the unrelaxed crystal (Niggli
reduction + wrapping, exactly as at inference), the relaxed crystal written in the same basis
with each atom on the periodic image nearest (in fractional coordinates) to its input, turned
back by the rigid rotation its relaxation picked up (``strain_rotation``) and placed in the
network's output frame (the input's fractional centroid), and the neighbour edges of the
input. Batching is then pure tensor indexing, on the GPU if the tensors live there
(``training.train.batching``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from e3relax_ase.geometry.canonical import canonicalize
from e3relax_ase.geometry.graph import CrystalGraph, neighbor_edges

# Changes whenever preparation gives other tensors for the same files (a stale cache must miss):
# 2 = targets rotated back (strain_rotation) and in the fractional-centroid frame, + ``source``.
PREPARATION_VERSION = 2


@dataclass
class PreparedPairs:
    """Flat tensors of many prepared pairs (offsets give each pair's atom and edge ranges)."""

    numbers: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N, 3] canonical unrelaxed positions, Å
    positions_target: torch.Tensor  # [N, 3] relaxed, same basis, nearest images, Å
    cell: torch.Tensor  # [n, 3, 3] reduced unrelaxed cell
    cell_target: torch.Tensor  # [n, 3, 3] relaxed cell in the same basis
    pbc: torch.Tensor  # [n, 3] bool
    atom_offsets: torch.Tensor  # [n + 1] int64
    edge_src: torch.Tensor  # [E] int64, local to its pair
    edge_dst: torch.Tensor  # [E] int64, local to its pair
    edge_shift: torch.Tensor  # [E, 3]
    edge_offsets: torch.Tensor  # [n + 1] int64
    source: torch.Tensor  # [n] int64 | which of the prepared files the pair came from

    def __len__(self) -> int:
        return self.cell.shape[0]

    def to(self, device) -> PreparedPairs:
        return PreparedPairs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def batch(self, indices: torch.Tensor) -> tuple[CrystalGraph, torch.Tensor, torch.Tensor]:
        """Collate pairs ``indices`` [b] into (graph, positions_target, cell_target)."""
        device = self.numbers.device
        indices = indices.to(device)
        atom_counts = self.atom_offsets[indices + 1] - self.atom_offsets[indices]
        edge_counts = self.edge_offsets[indices + 1] - self.edge_offsets[indices]
        atom_index = _ranges(self.atom_offsets[indices], atom_counts)
        edge_index = _ranges(self.edge_offsets[indices], edge_counts)
        new_atom_start = torch.cumsum(atom_counts, 0) - atom_counts
        edge_base = torch.repeat_interleave(new_atom_start, edge_counts)
        graph = CrystalGraph(
            numbers=self.numbers[atom_index],
            positions=self.positions[atom_index],
            cell=self.cell[indices],
            pbc=self.pbc[indices],
            batch=torch.repeat_interleave(torch.arange(len(indices), device=device), atom_counts),
            n_atoms=atom_counts,
            edge_src=self.edge_src[edge_index] + edge_base,
            edge_dst=self.edge_dst[edge_index] + edge_base,
            edge_shift=self.edge_shift[edge_index],
        )
        return graph, self.positions_target[atom_index], self.cell_target[indices]


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start, start + count) for each pair, without a Python loop."""
    total = int(counts.sum())
    begin = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - begin, counts) + torch.arange(total, device=starts.device)


def strain_rotation(cell_input: np.ndarray, cell_target: np.ndarray) -> np.ndarray:
    """The rotation Q [3, 3] of the left polar decomposition cell_input^-1 cell_target = S Q.

    S is symmetric positive definite: cell_input S = cell_target Q^T is the relaxed lattice
    reached by a pure strain, the only cell change the network can predict (a rigid rotation
    means nothing for a crystal). Relaxed cells often come rotated: codes and databases write
    cells in a standard orientation, so a sheared triclinic cell turns (NREL: 1,302 of 7,798
    training pairs by more than 1 degree, 150 by more than 20).
    """
    deformation = np.linalg.solve(cell_input, cell_target)
    u, _, wt = np.linalg.svd(deformation)
    rotation = u @ wt
    if np.linalg.det(rotation) < 0:  # a relaxation that flips handedness: not a rotation
        return np.eye(3)
    return rotation


def align_target(positions_input, cell_input, positions_target, cell_target, transform, pbc, center: bool = True):
    """The relaxed structure in the input's reduced basis, each atom on the image nearest its input.

    Args:
        positions_input: [n, 3] canonical (wrapped) input positions.
        cell_input: [3, 3] reduced input cell.
        positions_target, cell_target: the relaxed structure in the caller's basis.
        transform: [3, 3] int, reduced = transform @ caller's cell.
        pbc: [3] bool.
        center: place the target in the network's output frame (see Returns).

    Returns:
        (positions [n, 3], cell [3, 3]) of the relaxed structure, rotated back by
        ``strain_rotation`` when periodic in 3D, and with ``center`` translated rigidly so
        that its fractional centroid is the input's, as the network's output (and DFT codes,
        which deform the cell about the cell origin) keep it.
    """
    cell = transform @ cell_target
    if np.all(pbc):
        rotation = strain_rotation(cell_input, cell)
        cell = cell @ rotation.T
        positions_target = positions_target @ rotation.T
    fractional_input = np.linalg.solve(cell_input.T, positions_input.T).T
    fractional_target = np.linalg.solve(cell.T, positions_target.T).T
    shift = np.round(fractional_target - fractional_input)
    shift[:, ~pbc] = 0
    aligned = positions_target - shift @ cell
    if center:
        wanted = positions_input.mean(axis=0) @ np.linalg.solve(cell_input, cell)
        aligned = aligned - aligned.mean(axis=0) + wanted
    return aligned, cell


def prepare_pairs(pairset, cutoff: float, max_neighbors: int, dtype=torch.float32, center_targets: bool = True, workers: int = 1) -> PreparedPairs:
    """Canonicalise, align and build the edges of every pair of a ``PairSet`` (CPU, once).

    ``center_targets=False`` keeps the relaxed structure's own translation (for the paper's
    coordinate metric, which counts it as error). ``workers`` > 1 prepares contiguous chunks
    in that many processes (the preparation is per-pair Python work, slow for large sets on one
    core); the result is the same as with one.
    """
    if workers > 1 and len(pairset) > 256:
        import concurrent.futures
        import multiprocessing

        chunks = np.array_split(np.arange(len(pairset)), workers * 4)
        jobs = [(pairset.subset(chunk), cutoff, max_neighbors, dtype, center_targets) for chunk in chunks if len(chunk)]
        # spawn, not fork: a forked torch process can hang in its thread pools. One thread each:
        # workers each running torch's full thread team oversubscribe the cores and ran far slower
        # than one process.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = list(pool.map(_prepare_as_arrays, jobs))
        return concatenate_prepared([PreparedPairs(**{k: torch.as_tensor(v) for k, v in part.items()}) for part in parts])
    numbers, positions, targets, cells, cell_targets, pbcs = [], [], [], [], [], []
    srcs, dsts, shifts, edge_counts = [], [], [], []
    for k in range(len(pairset)):
        atoms = slice(pairset.offsets[k], pairset.offsets[k + 1])
        pbc = np.asarray(pairset.pbc[k], dtype=bool)
        form = canonicalize(pairset.pos_unrelaxed[atoms], pairset.cell_unrelaxed[k], pbc)
        target_positions, target_cell = align_target(
            form.positions, form.cell, pairset.pos_relaxed[atoms], pairset.cell_relaxed[k], form.transform, pbc, center_targets
        )
        src, dst, shift = neighbor_edges(torch.as_tensor(form.positions), torch.as_tensor(form.cell), torch.as_tensor(pbc), cutoff, max_neighbors)
        numbers.append(pairset.numbers[atoms])
        positions.append(form.positions)
        targets.append(target_positions)
        cells.append(form.cell)
        cell_targets.append(target_cell)
        pbcs.append(pbc)
        srcs.append(src)
        dsts.append(dst)
        shifts.append(shift)
        edge_counts.append(len(src))
    atom_offsets = np.concatenate([[0], np.cumsum([len(n) for n in numbers])])
    edge_offsets = np.concatenate([[0], np.cumsum(edge_counts)])
    return PreparedPairs(
        numbers=torch.as_tensor(np.concatenate(numbers), dtype=torch.long),
        positions=torch.as_tensor(np.concatenate(positions), dtype=dtype),
        positions_target=torch.as_tensor(np.concatenate(targets), dtype=dtype),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype),
        cell_target=torch.as_tensor(np.stack(cell_targets), dtype=dtype),
        pbc=torch.as_tensor(np.stack(pbcs)),
        atom_offsets=torch.as_tensor(atom_offsets, dtype=torch.long),
        edge_src=torch.cat(srcs),
        edge_dst=torch.cat(dsts),
        edge_shift=torch.cat(shifts).to(dtype),
        edge_offsets=torch.as_tensor(edge_offsets, dtype=torch.long),
        source=torch.zeros(len(numbers), dtype=torch.long),
    )


def _prepare_as_arrays(job) -> dict:
    """One chunk's ``prepare_pairs``, as numpy arrays to send between processes."""
    pairset, cutoff, max_neighbors, dtype, center_targets = job
    prepared = prepare_pairs(pairset, cutoff, max_neighbors, dtype, center_targets)
    return {f.name: getattr(prepared, f.name).numpy() for f in fields(prepared)}


def concatenate_prepared(parts) -> PreparedPairs:
    """Prepared pairs of several parts, in order, as one."""
    atom_base = np.cumsum([0] + [int(p.atom_offsets[-1]) for p in parts[:-1]])
    edge_base = np.cumsum([0] + [int(p.edge_offsets[-1]) for p in parts[:-1]])
    joined = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PreparedPairs) if not f.name.endswith("_offsets")}
    atom_offsets = torch.cat([parts[0].atom_offsets[:1]] + [p.atom_offsets[1:] + int(b) for p, b in zip(parts, atom_base)])
    edge_offsets = torch.cat([parts[0].edge_offsets[:1]] + [p.edge_offsets[1:] + int(b) for p, b in zip(parts, edge_base)])
    return PreparedPairs(**joined, atom_offsets=atom_offsets, edge_offsets=edge_offsets)


def load_or_prepare(
    paths, cutoff: float, max_neighbors: int, cache_dir=None, center_targets: bool = True, max_pairs: int = 0, workers: int = 1
) -> PreparedPairs:
    """Prepared pairs of one or more pair files, cached on disk under ``cache_dir``.

    The cache key is the files' sha256, the graph settings and the options, so a changed file
    or cutoff never reuses a stale cache.
    """
    import hashlib
    import os
    import tempfile
    from pathlib import Path

    from e3relax_ase.training.data.pairs import PairSet, load_pairs

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for path in paths:
            digest.update(Path(path).read_bytes())
        digest.update(f"{PREPARATION_VERSION}|{cutoff}|{max_neighbors}|{center_targets}|{max_pairs}".encode())
        cache_path = Path(cache_dir) / f"prepared_{digest.hexdigest()[:20]}.pt"
        if cache_path.exists():
            return PreparedPairs(**torch.load(cache_path, weights_only=True))
    sets = [load_pairs(p) for p in paths]
    pairs = sets[0] if len(sets) == 1 else PairSet.concatenate(sets)
    source = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    if max_pairs and len(pairs) > max_pairs:
        pairs = pairs.subset(range(max_pairs))
        source = source[:max_pairs]
    prepared = prepare_pairs(pairs, cutoff, max_neighbors, center_targets=center_targets, workers=workers)
    prepared.source = torch.as_tensor(source, dtype=torch.long)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            torch.save({f.name: getattr(prepared, f.name) for f in fields(prepared)}, stream)
        os.replace(tmp, cache_path)
    return prepared
