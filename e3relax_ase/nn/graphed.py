"""The forward pass of small batches on CUDA, replayed from captured CUDA graphs.

A small batch (one crystal of 20 atoms, say) costs the GPU little, but the forward pass is
hundreds of kernels, each launched from Python, so one small crystal eagerly on a GPU is no
faster than on a CPU (latency in benchmarks/README.md). A CUDA graph records the launches once
and replays them in one call.

A graph replays fixed shapes, so a batch is padded to a bucket: atoms, edges and crystals each
rounded up to a power of two. The padding is one extra crystal that holds every padding atom
(and further empty crystals): a 50 Å cube whose atoms sit at its origin, each padding edge
joining the first padding atom to its own image 50 Å away, beyond any cutoff. The network
never mixes crystals (every sum runs over one crystal's atoms and edges), so the padding
cannot change a real crystal's prediction; ``tests/nn/test_graphed.py`` checks that on the eager
network. Shapes differ from an unpadded pass, so float32 sums may run in another order: the
outputs agree to float32 noise, as batches of different sizes already do on CUDA.

Large batches stay eager. Replaying them too (finer buckets, a larger captured bucket reused)
showed no consistent gain end to end on a GPU host with workers (one call faster than eager,
one slower), while the captures (two warm-up passes each) held a sizeable share of the main
thread's stack samples (an older benchmarks/README.md, in git history).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from e3relax_ase.geometry.graph import CrystalGraph
from e3relax_ase.nn.model import ModelOutput
from e3relax_ase.nn.precision import matmul_precision

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from e3relax_ase.nn.architectures import Network

GRAPHED_MAX_ATOMS = 512  # batches up to this many atoms replay a graph; larger ones are not launch bound
MAX_CAPTURED = 32  # graphs kept per relaxer (the oldest is dropped); each holds its padded shapes
PADDING_CELL = 50.0  # Å, edge of the padding crystal's cube: its edges are longer than any cutoff
_SMALLEST_BUCKET = {"atoms": 16, "edges": 256, "graphs": 2}


def bucket(count: int, smallest: int) -> int:
    """``count`` rounded up to a power of two, at least ``smallest``."""
    size = smallest
    while size < count:
        size *= 2
    return size


def padded_sizes(graph: CrystalGraph) -> tuple[int, int, int]:
    """(atoms, edges, crystals) of the bucket ``graph`` is padded to: room for at least one
    padding atom and one padding crystal."""
    return (
        bucket(graph.positions.shape[0] + 1, _SMALLEST_BUCKET["atoms"]),
        bucket(graph.n_edges, _SMALLEST_BUCKET["edges"]),
        bucket(graph.n_graphs + 1, _SMALLEST_BUCKET["graphs"]),
    )


def pad_graph(graph: CrystalGraph, n_atoms: int, n_edges: int, n_graphs: int) -> CrystalGraph:
    """``graph`` with padding atoms, edges and crystals appended (see the module docstring).

    The real crystals keep their indices and their atoms and edges come first, so the first
    ``graph.n_graphs`` crystals and ``len(graph.positions)`` atoms of the output are theirs.
    """
    real_atoms, real_edges, real_graphs = graph.positions.shape[0], graph.n_edges, graph.n_graphs
    if n_atoms <= real_atoms or n_edges < real_edges or n_graphs <= real_graphs:
        raise ValueError(f"padding needs room for one more atom and crystal, got {n_atoms} atoms and {n_graphs} crystals")
    extra_atoms, extra_edges, extra_graphs = n_atoms - real_atoms, n_edges - real_edges, n_graphs - real_graphs
    device, dtype = graph.positions.device, graph.positions.dtype

    def full(shape, value, like):
        return torch.full(shape, value, dtype=like.dtype, device=device)

    padding_cell = PADDING_CELL * torch.eye(3, dtype=dtype, device=device).expand(extra_graphs, 3, 3)
    padding_shift = torch.zeros(extra_edges, 3, dtype=graph.edge_shift.dtype, device=device)
    padding_shift[:, 0] = 1.0
    n_atoms_per_graph = torch.zeros(extra_graphs, dtype=graph.n_atoms.dtype, device=device)
    n_atoms_per_graph[0] = extra_atoms
    return CrystalGraph(
        numbers=torch.cat([graph.numbers, full((extra_atoms,), 1, graph.numbers)]),
        positions=torch.cat([graph.positions, torch.zeros(extra_atoms, 3, dtype=dtype, device=device)]),
        cell=torch.cat([graph.cell, padding_cell]),
        pbc=torch.cat([graph.pbc, full((extra_graphs, 3), True, graph.pbc)]),
        batch=torch.cat([graph.batch, full((extra_atoms,), real_graphs, graph.batch)]),
        n_atoms=torch.cat([graph.n_atoms, n_atoms_per_graph]),
        edge_src=torch.cat([graph.edge_src, full((extra_edges,), real_atoms, graph.edge_src)]),
        edge_dst=torch.cat([graph.edge_dst, full((extra_edges,), real_atoms, graph.edge_dst)]),
        edge_shift=torch.cat([graph.edge_shift, padding_shift]),
    )


def unpad_output(output: ModelOutput, n_atoms: int, n_graphs: int) -> ModelOutput:
    """The real crystals' part of a padded pass's output."""
    return ModelOutput(output.positions[:, :n_atoms], output.cell[:, :n_graphs])


class _Captured:
    """One captured forward pass: its CUDA graph, the input tensors it reads, the output it writes."""

    def __init__(self, cuda_graph: torch.cuda.CUDAGraph, inputs: CrystalGraph, output: ModelOutput):
        self.cuda_graph, self.inputs, self.output = cuda_graph, inputs, output


class GraphedForward:
    """``model(graph)`` for small CUDA batches, from a CUDA graph captured per bucket.

    Call it as the model: ``forward(graph, precision)`` returns the ``ModelOutput`` of the
    real crystals. The first batch of a bucket runs eagerly, as without graphs; the second
    pays the capture (two warm-up passes and the recording); later ones replay it. So
    relaxing one structure costs what it did, and a stream of them gains from the third on.
    ``handles(graph)`` says whether a batch goes this way; others should run the model itself.
    """

    def __init__(self, model: Network, max_atoms: int = GRAPHED_MAX_ATOMS):
        self.model, self.max_atoms = model, max_atoms
        self._captured: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: set[tuple] = set()  # buckets run once eagerly, captured when seen again
        self._pool: _POOL_HANDLE | None = None  # one memory pool for every graph: they never run at the same time

    def handles(self, graph: CrystalGraph) -> bool:
        return graph.positions.device.type == "cuda" and graph.positions.shape[0] <= self.max_atoms

    def __call__(self, graph: CrystalGraph, precision: str = "float32") -> ModelOutput:
        # Inference tensors throughout: a captured graph's inputs are written in place on every
        # call, which torch allows only in the mode they were made in.
        with torch.inference_mode(), torch.cuda.device(graph.positions.device):
            return self._replay(graph, precision)

    def _replay(self, graph: CrystalGraph, precision: str) -> ModelOutput:
        sizes = padded_sizes(graph)
        key = (*sizes, graph.positions.dtype, precision, graph.positions.device)
        captured = self._captured.get(key)
        if captured is None and key not in self._seen:
            self._seen.add(key)
            with matmul_precision(precision, graph.positions.device):
                return self.model(graph)
        padded = pad_graph(graph, *sizes)
        if captured is None:
            captured = self._capture(padded, precision)
            self._captured[key] = captured
            if len(self._captured) > MAX_CAPTURED:
                self._captured.popitem(last=False)
        else:
            self._captured.move_to_end(key)
            for name, value in vars(padded).items():
                getattr(captured.inputs, name).copy_(value)
            captured.cuda_graph.replay()
        # Cloned: the next replay overwrites the captured output.
        output = unpad_output(captured.output, graph.positions.shape[0], graph.n_graphs)
        return ModelOutput(output.positions.clone(), output.cell.clone())

    def _capture(self, padded: CrystalGraph, precision: str) -> _Captured:
        """Record the model's pass over ``padded`` (whose tensors become the graph's inputs)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=padded.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), matmul_precision(precision, padded.positions.device):
            for _ in range(2):  # warm-up on a side stream, as capture requires (kernels chosen, memory held)
                self.model(padded)
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._pool), matmul_precision(precision, padded.positions.device):
            output = self.model(padded)
        cuda_graph.replay()  # the capture only recorded: run it once for this batch
        return _Captured(cuda_graph, padded, output)
