"""The paper's E3Relax-H2 with three lattice nodes, one per basis vector ("axis-lattice").

Kept only to load checkpoints trained before the basis-free design (``model.py``): its lattice
nodes carry the index of a basis vector, so its prediction depends on the basis, on
supercells and on where the atoms are wrapped (docs/method.md). The trainer refuses it.
Its output is put in the frame of ``model.py``'s: the input's fractional centroid kept.
"""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.config import ModelConfig
from e3relax_ase.geometry.graph import CrystalGraph, edge_vectors
from e3relax_ase.nn.broadcast import LatticeToAtom
from e3relax_ase.nn.h2mp import H2MessagePassing
from e3relax_ase.nn.lattice import AtomToLattice, LatticeMixing
from e3relax_ase.nn.model import ModelOutput
from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.nn.self_interaction import SelfInteraction
from e3relax_ase.nn.solve import solve_unchecked


class InteractionLayer(nn.Module):
    """One layer: broadcast, H2-MP, self-interaction, lattice updates, structure update."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.num_channels
        self.positions_follow_cell = config.positions_follow_cell
        self.broadcast = LatticeToAtom(f, config.num_lattice_rbf, config.lattice_rbf_range)
        self.message_passing = H2MessagePassing(f, config.num_rbf, config.cutoff, config.envelope_exponent, config.l_max, config.avg_num_neighbors)
        self.self_interaction = SelfInteraction(f)
        self.atom_to_lattice = AtomToLattice(f, config.num_lattice_rbf, config.lattice_rbf_range)
        self.lattice_mixing = LatticeMixing()
        # Bias-free heads F -> 1: W_p turns atom vectors into displacements, W_l turns axis c's
        # vectors into the displacement of lattice vector c (a ROW of the cell).
        self.w_position = nn.Parameter(torch.randn(f) * config.output_init_scale)
        self.w_lattice = nn.Parameter(torch.randn(f) * config.output_init_scale)

    def lattice_step(self, u: torch.Tensor) -> torch.Tensor:
        """[n_graphs, 3, F, 3] -> [n_graphs, 3, 3]: axis c's displacement becomes ROW c of the cell.

        Geometry (this head, the position head, the affine carry, edge vectors) is written with
        elementwise products and sums, not einsum: under bfloat16 autocast einsum would round
        coordinates of ~10 Å to ~0.04 Å, while elementwise ops keep their inputs' float32.
        """
        return (u * self.w_lattice.to(u.dtype)[:, None]).sum(dim=-2)

    def forward(self, graph: CrystalGraph, state: dict, message_passing=None) -> dict:
        """One layer; ``message_passing`` runs in place of ``self.message_passing`` when given
        (the same function compiled: ``compiled.CompiledForward``)."""
        h, v, s, u = state["h"], state["v"], state["s"], state["u"]
        positions, cell = state["positions"], state["cell"]
        h, v, u = self.broadcast(h, v, s, u, positions, cell, graph.batch, graph.n_graphs)
        message_passing = self.message_passing if message_passing is None else message_passing
        m, mv, _ = message_passing(h, v, edge_vectors(graph, positions, cell), graph.edge_src, graph.edge_dst)
        h, v = self.self_interaction(h, v, m, mv)
        s, u = self.atom_to_lattice(h, v, s, u, cell, graph.batch)
        s, u = self.lattice_mixing(s, u)

        lattice_step = self.lattice_step(u)
        # A vacuum (non-periodic) axis is never stretched or turned.
        lattice_step = lattice_step * graph.pbc.unsqueeze(-1).to(lattice_step.dtype)
        new_cell = cell + lattice_step
        if self.positions_follow_cell:
            # Carry atoms with the cell: keep fractional coordinates relative to the centroid
            # (r - c) L^-1 L' + c; the centroid keeps it translation equivariant.
            deformation = solve_unchecked(cell, new_cell)  # [n_graphs, 3, 3] = L^-1 L'
            centroid = scatter_mean(positions, graph.batch, graph.n_graphs)[graph.batch]
            positions = centroid + ((positions - centroid).unsqueeze(-1) * deformation[graph.batch]).sum(dim=-2)
        positions = positions + (v * self.w_position.to(v.dtype)[:, None]).sum(dim=-2)
        return {"h": h, "v": v, "s": s, "u": u, "positions": positions, "cell": new_cell}


class AxisLatticeE3RelaxH2(nn.Module):
    """The paper's E3Relax-H2 network (shared/docs/METHOD.md), every hyperparameter in ``config``."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig(architecture="axis-lattice")
        if self.config.architecture != "axis-lattice":
            raise ValueError(f"AxisLatticeE3RelaxH2 builds the 'axis-lattice' architecture, not {self.config.architecture!r}")
        f = self.config.num_channels
        self.atom_embedding = nn.Embedding(self.config.max_atomic_number + 1, f)
        self.axis_embedding = nn.Embedding(3, f)
        self.layers = nn.ModuleList([InteractionLayer(self.config) for _ in range(self.config.num_layers)])

    def forward(self, graph: CrystalGraph, message_passing=None) -> ModelOutput:
        """Predict every layer's structure for a batch of crystals.

        Args:
            graph: batched crystals; positions should be wrapped into the cell and the cell
                reduced (``e3relax_ase.geometry.canonical`` does both) for the prediction to be
                invariant to how the input is written.
            message_passing: per layer, a callable to run in place of the layer's
                ``message_passing`` (its compiled form, ``compiled.CompiledForward``), or None.

        Returns:
            ModelOutput with positions [T, n_atoms, 3] and cell [T, n_graphs, 3, 3].
        """
        dtype = graph.positions.dtype
        n_atoms, f = graph.positions.shape[0], self.config.num_channels
        axis = torch.arange(3, device=graph.positions.device)
        state = {
            "h": self.atom_embedding(graph.numbers).to(dtype),
            "v": graph.positions.new_zeros(n_atoms, f, 3),
            "s": self.axis_embedding(axis).to(dtype).unsqueeze(0).expand(graph.n_graphs, -1, -1),
            "u": graph.positions.new_zeros(graph.n_graphs, 3, f, 3),
            "positions": graph.positions,
            "cell": graph.cell,
        }
        positions, cells = [], []
        for k, layer in enumerate(self.layers):
            state = layer(graph, state, message_passing[k] if message_passing is not None else None)
            positions.append(state["positions"])
            cells.append(state["cell"])
        cell = torch.stack(cells)
        return ModelOutput(keep_fractional_centroid(torch.stack(positions), cell, graph.positions, graph.cell, graph.batch), cell)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def keep_fractional_centroid(
    positions_pred: torch.Tensor, cell_pred: torch.Tensor, positions_in: torch.Tensor, cell_in: torch.Tensor, batch: torch.Tensor
) -> torch.Tensor:
    """Translate each predicted crystal so its fractional centroid is the input's.

    This network keeps the Cartesian centroid. DFT codes keep the fractional one (they deform
    the cell about the cell origin), as ``model.py``'s network does by construction; being
    rigid, the translation changes no interatomic geometry.

    Args:
        positions_pred: [..., n_atoms, 3] (a leading layer axis is allowed).
        cell_pred: [..., n_graphs, 3, 3].
        positions_in: [n_atoms, 3]; cell_in: [n_graphs, 3, 3]; batch: [n_atoms].

    Returns:
        Translated positions, shape of ``positions_pred``.
    """
    n_graphs = cell_in.shape[0]
    centroid_in = scatter_mean(positions_in, batch, n_graphs)  # [n_graphs, 3]
    fractional = solve_unchecked(cell_in.transpose(-1, -2), centroid_in.unsqueeze(-1)).squeeze(-1)
    wanted = torch.einsum("gc,...gcx->...gx", fractional, cell_pred)  # [..., n_graphs, 3]
    current = torch.stack([scatter_mean(p, batch, n_graphs) for p in positions_pred.reshape(-1, *positions_pred.shape[-2:])])
    current = current.reshape(wanted.shape)
    return positions_pred + (wanted - current)[..., batch, :]
