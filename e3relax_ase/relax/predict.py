"""From plain arrays to predicted arrays: canonical form -> graph -> network -> caller's frame.

This is the one place where the network meets data; the ASE/pymatgen layer (``relaxer``) and
the training code both call it, so invariance to how the input is written holds everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from e3relax_ase.geometry.canonical import CanonicalForm, canonicalize, image_translation
from e3relax_ase.geometry.crystal import CrystalArrays
from e3relax_ase.geometry.graph import CrystalGraph, build_graph
from e3relax_ase.nn.architectures import Network
from e3relax_ase.nn.compiled import CompiledForward
from e3relax_ase.nn.graphed import GraphedForward
from e3relax_ase.nn.precision import matmul_precision


@dataclass
class Prediction:
    """Every layer's predicted structure in the caller's basis and periodic images."""

    positions: np.ndarray  # [n_layers, n_atoms, 3] Å
    cell: np.ndarray  # [n_layers, 3, 3] Å


def graph_from_canonical(crystals: Sequence[CrystalArrays], forms: Sequence[CanonicalForm], cutoff: float, max_neighbors: int, device, dtype) -> CrystalGraph:
    """Build the batched graph of crystals already in canonical form.

    The edges are those of the float64 canonical crystal whatever ``dtype`` is (the search
    validation runs, which ``preparation.graph_edges`` reuses): the network's precision rounds
    the positions it computes with, not the choice of neighbours.
    """
    return build_graph(
        [torch.as_tensor(c.numbers, dtype=torch.long, device=device) for c in crystals],
        [torch.as_tensor(f.positions, dtype=torch.float64, device=device) for f in forms],
        [torch.as_tensor(f.cell, dtype=torch.float64, device=device) for f in forms],
        [torch.as_tensor(np.asarray(c.pbc, dtype=bool), device=device) for c in crystals],
        cutoff,
        max_neighbors,
        dtype=dtype,
    )


@overload
def predict(
    model: Network,
    crystals: Sequence[CrystalArrays],
    device: torch.device | str = ...,
    dtype: torch.dtype = ...,
    reduce_cell: bool = ...,
    *,
    forms: Sequence[CanonicalForm] | None = ...,
    graph: CrystalGraph | None = ...,
    precision: str = ...,
    wait: Literal[True] = ...,
    forward: GraphedForward | CompiledForward | Sequence | None = ...,
) -> list[Prediction]: ...
@overload
def predict(
    model: Network,
    crystals: Sequence[CrystalArrays],
    device: torch.device | str = ...,
    dtype: torch.dtype = ...,
    reduce_cell: bool = ...,
    *,
    forms: Sequence[CanonicalForm] | None = ...,
    graph: CrystalGraph | None = ...,
    precision: str = ...,
    wait: Literal[False],
    forward: GraphedForward | CompiledForward | Sequence | None = ...,
) -> PendingPredictions: ...
@torch.no_grad()
def predict(
    model: Network,
    crystals: Sequence[CrystalArrays],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    reduce_cell: bool = True,
    *,
    forms: Sequence[CanonicalForm] | None = None,
    graph: CrystalGraph | None = None,
    precision: str = "float32",
    wait: bool = True,
    forward: GraphedForward | CompiledForward | Sequence | None = None,
) -> list[Prediction] | PendingPredictions:
    """Predict the relaxed structures of a batch of crystals in one forward pass.

    Args:
        model: the network (already on ``device``, in ``dtype``).
        crystals: the inputs.
        device, dtype: where and in which precision to run.
        reduce_cell: Niggli-reduce 3D-periodic cells before the network.
        forms: the crystals' canonical forms if already computed (``canonicalize`` with
            ``reduce_cell``, or ``validation.prepare_arrays``); computed here otherwise.
        graph: their graph if already built (``graph_from_canonical`` of ``forms``, or
            ``graph.graph_from_edges``), on any device; moved to ``device`` in one transfer.
        precision: "float32", "tf32" or "bf16" for the network's channel mixing
            (``e3relax_ase.nn.precision``).
        wait: False returns as soon as the pass is queued on the device, as
            ``PendingPredictions`` (on CUDA the pass then runs while the caller works on;
            on a CPU it has run already).
        forward: another way to run ``model``'s forward pass, or several in order of
            preference; the first whose ``handles(graph)`` is true runs the batch, and the
            plain ``model(graph)`` runs it otherwise: ``graphed.GraphedForward`` replays small
            CUDA batches from captured CUDA graphs, ``compiled.CompiledForward`` runs any
            batch with the message passing compiled.

    Returns:
        One ``Prediction`` per crystal, in the caller's lattice basis and atom images (with
        ``wait=False``: ``PendingPredictions``, whose ``result()`` returns them).
    """
    if forms is None:
        forms = [canonicalize(c.positions, c.cell, c.pbc, reduce=reduce_cell) for c in crystals]
    if graph is None:
        graph = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, device, dtype)
    else:
        graph = to_device(graph, device, dtype)
    runner = next((f for f in _as_list(forward) if f.handles(graph)), None)
    if runner is not None:
        output = runner(graph, precision)
    else:
        with matmul_precision(precision, device):
            output = model(graph)
    positions = output.positions
    bounds = np.concatenate([[0], np.cumsum([len(c.numbers) for c in crystals])]).tolist()
    pending = PendingPredictions(forms, positions, output.cell, bounds)
    return pending if not wait else pending.result()


def _as_list(forward) -> list:
    if forward is None:
        return []
    if isinstance(forward, (list, tuple)):
        return [f for f in forward if f is not None]
    return [forward]


class PendingPredictions:
    """A batch's predictions while its forward pass may still run on the device.

    On CUDA the outputs are copied into pinned host memory behind the pass, on the same
    stream, and an event marks the end of the copy: nothing waits until ``result()``. The
    forward pass never reads a value back to the host (``nn.solve``, ``nn.scatter``), so
    the CPU queues the whole pass and is free until then. The numbers are those of a
    waiting call: the same kernels, the same float64 conversion on the device.
    """

    def __init__(self, forms: Sequence[CanonicalForm], positions: torch.Tensor, cells: torch.Tensor, bounds: list[int]):
        self._forms, self._bounds = forms, bounds
        self._positions = _to_host_float64(positions)  # [T, n_atoms, 3]
        self._cells = _to_host_float64(cells)  # [T, n_graphs, 3, 3]
        self._done = None
        if positions.device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record()

    def result(self) -> list[Prediction]:
        """Wait for the pass (if it still runs) and map every prediction back to its input."""
        if self._done is not None:
            self._done.synchronize()
        return restore_all(self._forms, self._positions.numpy(), self._cells.numpy(), self._bounds)


class ReadyPredictions:
    """Predictions already in hand, in the shape of ``PendingPredictions``."""

    def __init__(self, predictions: list[Prediction]):
        self._predictions = predictions

    def result(self) -> list[Prediction]:
        return self._predictions


def _to_host_float64(values: torch.Tensor) -> torch.Tensor:
    """``values`` as float64 on the host: on CUDA an asynchronous copy into pinned memory."""
    values = values.to(torch.float64)
    if values.device.type != "cuda":
        return values.cpu()
    host = torch.empty(values.shape, dtype=torch.float64, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def restore_all(forms: Sequence[CanonicalForm], positions: np.ndarray, cells: np.ndarray, bounds: list[int]) -> list[Prediction]:
    """``form.restore`` of every crystal of a batch, bit for bit, with the work done per batch.

    Args:
        forms: the crystals' canonical forms.
        positions: [n_layers, n_atoms, 3] float64, the batch's predicted canonical positions.
        cells: [n_layers, n_graphs, 3, 3] float64, the predicted reduced cells.
        bounds: [n_graphs + 1] atom offsets of the crystals.

    ``restore``'s time is mostly numpy's per-call overhead, and most crystals of real inputs
    have some atom outside the reduced cell. Here one batched ``solve`` runs LAPACK's gesv on
    each matrix as the per-crystal call does, and the image translations of every moved atom
    are one elementwise expression (``canonical.image_translation``): the same numbers as
    ``restore``, atom by atom.
    """
    transforms = np.array([form.transform for form in forms], dtype=cells.dtype)  # [n_graphs, 3, 3]
    cells_input_basis = np.linalg.solve(transforms, cells)  # [n_layers, n_graphs, 3, 3]
    restored = np.array(positions, dtype=np.result_type(positions, cells), copy=True)
    shifts = np.concatenate([form.image_shift for form in forms])  # [n_atoms, 3]
    moved = shifts.any(axis=1)
    if moved.any():
        crystal_of_atom = np.repeat(np.arange(len(forms)), np.diff(bounds))
        restored[:, moved] += image_translation(shifts[moved], cells[:, crystal_of_atom[moved]])
    return [Prediction(restored[:, bounds[index] : bounds[index + 1]].copy(), cells_input_basis[:, index].copy()) for index in range(len(forms))]


def to_device(graph: CrystalGraph, device, dtype: torch.dtype) -> CrystalGraph:
    """A graph on ``device`` in ``dtype``: one pinned, asynchronous copy per field to CUDA."""
    device = torch.device(device)
    if graph.positions.device == device:
        return graph.to(device, dtype)
    if device.type == "cuda" and graph.positions.device.type == "cpu":
        graph = graph.pin_memory()
    return graph.to(device, dtype, non_blocking=True)
