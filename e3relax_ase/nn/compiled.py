"""The forward pass with each layer's message passing compiled by ``torch.compile``.

The message passing is where the time of a large batch goes: a chain of per-edge elementwise
operations, gathers and scatters between the matrix products, each reading and writing
[n_edges, F] (or [n_edges, F, 3]) tensors. Eager PyTorch runs each as its own kernel through
GPU memory; Inductor fuses the chain. Compiling the message passing alone gives most of the
speed of compiling the whole network for a small part of its compilation wait, which is why
only the message passing is compiled (``probe_compile.py`` in benchmarks/README.md).

Compiled with ``dynamic=True``: one compilation serves every batch size (a batch of a new size
does not recompile). The compiled function is the same layer's code on the same parameters, so
the model itself is not changed (the layers are called with ``message_passing=``); its outputs
agree with the eager pass to rounding of the dtype (fused kernels sum in another order).
Inductor needs a C++ compiler on a CPU and Triton on CUDA (PyTorch's CUDA wheels bring it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from e3relax_ase.geometry.graph import CrystalGraph
from e3relax_ase.nn.model import ModelOutput
from e3relax_ase.nn.precision import matmul_precision

if TYPE_CHECKING:
    from e3relax_ase.nn.architectures import Network


def compile_message_passing(model: Network) -> list:
    """Each layer's message passing, compiled by ``torch.compile`` with ``dynamic=True``."""
    compiled = []
    for layer in model.layers:
        message_passing = layer.message_passing
        assert isinstance(message_passing, nn.Module)  # an H2MessagePassing (a Module's attributes are typed Tensor | Module)
        compiled.append(torch.compile(message_passing, dynamic=True))
    return compiled


class CompiledForward:
    """``model``'s forward pass with its layers' message passing compiled (module docstring).

    Compilation happens on the first call, not here. Used by ``predict`` like
    ``graphed.GraphedForward``: ``handles(graph)`` and ``forward(graph, precision)``.
    """

    def __init__(self, model: Network):
        self.model = model
        self.message_passing = compile_message_passing(model)

    def handles(self, graph: CrystalGraph) -> bool:
        return True

    def __call__(self, graph: CrystalGraph, precision: str = "float32") -> ModelOutput:
        with matmul_precision(precision, graph.positions.device):
            return self.model(graph, message_passing=self.message_passing)
