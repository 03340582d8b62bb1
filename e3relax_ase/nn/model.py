"""E3Relax-H2 with a basis-free crystal node: the relaxed positions and cell of crystals in one
forward pass, a function of the crystal and not of how it is written.

The network is a pure function of a batched ``CrystalGraph``: no file IO, no ASE, no
neighbour search and no device picking happen here. docs/method.md says where and why this
departs from the paper's three lattice nodes (``model_axis_lattice.py`` keeps that design to
load older checkpoints).

Geometry of layer t, per crystal (cell rows, keys.py): with the input cell L and positions r,
    cell_t = L (I + E_t),    positions_t = r (I + E_t) + D_t,
where E_t is the deformation so far (a sum of symmetric strain steps; for slabs restricted to
the periodic directions) and D_t the learned displacements, whose mean over the crystal is
zero. So the strain keeps fractional coordinates, as DFT codes do, and the output frame is
theirs: the fractional centroid of the input is kept. Edge vectors follow as
e_t = e_0 (I + E_t) + D_j - D_i from the input's e_0: a periodic image of an atom (r + n L)
comes out as the same image of the prediction (+ n cell_t), and no quantity depends on where
the crystal sits, which image an atom is written in, or on the lattice basis.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from e3relax_ase.config import ModelConfig
from e3relax_ase.geometry.graph import CrystalGraph, edge_vectors
from e3relax_ase.nn.crystal import AtomToCrystal, CrystalToAtom
from e3relax_ase.nn.h2mp import H2MessagePassing
from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.nn.self_interaction import SelfInteraction
from e3relax_ase.nn.strain import PeriodicRestriction, StrainHead, matmul3, strain_invariants


class ModelOutput(NamedTuple):
    """Every layer's intermediate structure; index -1 is the prediction."""

    positions: torch.Tensor  # [n_layers, n_atoms, 3] Å
    cell: torch.Tensor  # [n_layers, n_graphs, 3, 3] rows are lattice vectors, Å


class InteractionLayer(nn.Module):
    """One layer: crystal-to-atom, H2-MP, self-interaction, atom-to-crystal, strain and displacement."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.num_channels
        self.crystal_to_atom = CrystalToAtom(f)
        self.message_passing = H2MessagePassing(
            f,
            config.num_rbf,
            config.cutoff,
            config.envelope_exponent,
            config.l_max,
            config.avg_num_neighbors,
            num_tensor_channels=config.num_strain_channels,
        )
        self.self_interaction = SelfInteraction(f)
        self.atom_to_crystal = AtomToCrystal(f)
        self.strain_head = StrainHead(f, config.num_strain_channels, config.max_strain_step, config.output_init_scale)
        # Bias-free head F -> 1: W_p turns atom vectors into displacements.
        self.w_position = nn.Parameter(torch.randn(f) * config.output_init_scale)

    def forward(self, graph: CrystalGraph, state: dict, geometry: InputGeometry, message_passing=None) -> dict:
        """One layer; ``message_passing`` runs in place of ``self.message_passing`` when given
        (the same function compiled: ``compiled.CompiledForward``)."""
        h, v, s, u = state["h"], state["v"], state["s"], state["u"]
        deformation, displacement = state["deformation"], state["displacement"]  # E [n_graphs, 3, 3], D [n_atoms, 3]
        symmetric = 0.5 * (deformation + deformation.transpose(-1, -2))
        h, v = self.crystal_to_atom(h, v, s, u, symmetric, graph.batch)
        edge_vec = (
            geometry.edge_vec + matmul3(geometry.edge_vec, deformation[geometry.edge_graph]) + displacement[graph.edge_src] - displacement[graph.edge_dst]
        )
        message_passing = self.message_passing if message_passing is None else message_passing
        m, mv, edge_tensors = message_passing(h, v, edge_vec, graph.edge_src, graph.edge_dst)
        h, v = self.self_interaction(h, v, m, mv)
        s, u = self.atom_to_crystal(h, v, s, u, strain_invariants(deformation), graph.batch)

        deformation = deformation + geometry.restrict(self.strain_head(s, v, u, edge_tensors, graph.batch))
        step = (v * self.w_position.to(v.dtype)[:, None]).sum(dim=-2)  # [n_atoms, 3]
        # A mean displacement is a rigid translation, which means nothing for a crystal: removed,
        # so the output keeps the input's fractional centroid (module docstring).
        step = step - scatter_mean(step, graph.batch, graph.n_graphs).to(step.dtype)[graph.batch]
        return {"h": h, "v": v, "s": s, "u": u, "deformation": deformation, "displacement": displacement + step}


class InputGeometry:
    """What every layer reads of the input geometry, computed once per forward pass."""

    def __init__(self, graph: CrystalGraph):
        self.edge_vec = edge_vectors(graph, graph.positions, graph.cell)  # [n_edges, 3] e_0
        self.edge_graph = graph.batch[graph.edge_dst]  # [n_edges] crystal of each edge
        self.restrict = PeriodicRestriction(graph.cell, graph.pbc)


class E3RelaxH2(nn.Module):
    """E3Relax-H2 with a basis-free crystal node (module docstring), every hyperparameter in ``config``."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        if self.config.architecture != "strain":
            raise ValueError(f"E3RelaxH2 builds the 'strain' architecture, not {self.config.architecture!r} (architectures.build_model)")
        f = self.config.num_channels
        self.atom_embedding = nn.Embedding(self.config.max_atomic_number + 1, f)
        self.crystal_embedding = nn.Parameter(torch.randn(f))
        self.layers = nn.ModuleList([InteractionLayer(self.config) for _ in range(self.config.num_layers)])

    def forward(self, graph: CrystalGraph, message_passing=None) -> ModelOutput:
        """Predict every layer's structure for a batch of crystals.

        Args:
            graph: batched crystals, any lattice basis and any periodic images of the atoms
                (``e3relax_ase.geometry.canonical`` still reduces and wraps them: smaller coordinates
                round less).
            message_passing: per layer, a callable to run in place of the layer's
                ``message_passing`` (its compiled form, ``compiled.CompiledForward``), or None.

        Returns:
            ModelOutput with positions [T, n_atoms, 3] and cell [T, n_graphs, 3, 3], in the
            input's lattice basis and atom images, with the input's fractional centroid.
        """
        positions_in, cell_in = graph.positions, graph.cell
        dtype = positions_in.dtype
        n_atoms, n_graphs, f = positions_in.shape[0], graph.n_graphs, self.config.num_channels
        geometry = InputGeometry(graph)
        state = {
            "h": self.atom_embedding(graph.numbers).to(dtype),
            "v": positions_in.new_zeros(n_atoms, f, 3),
            "s": self.crystal_embedding.to(dtype).expand(n_graphs, f),
            "u": positions_in.new_zeros(n_graphs, f, 3),
            "deformation": cell_in.new_zeros(n_graphs, 3, 3),
            "displacement": positions_in.new_zeros(n_atoms, 3),
        }
        periodic_rows = graph.pbc.to(dtype).unsqueeze(-1)  # [n_graphs, 3, 1]
        positions, cells = [], []
        for k, layer in enumerate(self.layers):
            state = layer(graph, state, geometry, message_passing[k] if message_passing is not None else None)
            deformation = state["deformation"]
            positions.append(positions_in + matmul3(positions_in, deformation[graph.batch]) + state["displacement"])
            # A vacuum vector's own increment is zero up to the rounding of cell_in cell_in^-1:
            # masked, so that it is kept exactly.
            cells.append(cell_in + matmul3(cell_in, deformation) * periodic_rows)
        return ModelOutput(torch.stack(positions), torch.stack(cells))

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
