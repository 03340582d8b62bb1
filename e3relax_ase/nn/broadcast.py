"""Lattice-to-atom broadcast: every lattice node talks to every atom of its crystal."""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.mlp import MLP, VectorLinear, safe_norm
from e3relax_ase.nn.radial import GaussianBasis
from e3relax_ase.nn.scatter import scatter_mean


class LatticeToAtom(nn.Module):
    """Broadcast lattice-node state to atoms (METHOD.md, layer step 1).

    Positions are centred on their crystal's mean first, which makes the geometric features
    translation invariant. For each axis c the atom sees its parallel projection on l_c and its
    perpendicular distance to the l_c line (invariants), and a direction carrier along
    l_c - r~_i (equivariant).
    """

    def __init__(self, channels: int, num_lattice_rbf: int, lattice_rbf_range: float):
        super().__init__()
        self.rbf_parallel = GaussianBasis(-lattice_rbf_range, lattice_rbf_range, num_lattice_rbf)
        self.rbf_perpendicular = GaussianBasis(0.0, lattice_rbf_range, num_lattice_rbf)
        self.geometry = MLP([2 * num_lattice_rbf, channels, channels])
        self.phi_as = nn.Linear(channels, channels)
        self.phi_ls = nn.Linear(channels, channels)
        self.phi_av = nn.Linear(channels, channels)
        self.phi_rv = nn.Linear(channels, channels)
        # W_c: one channel map per axis for the lattice vector features.
        self.w_axis = nn.ModuleList([VectorLinear(channels, channels) for _ in range(3)])
        # The lattice node's own axis direction seeds its vector features: without it, a
        # centrosymmetric crystal (whose mean atomic vector features vanish by symmetry) could
        # never update its lattice vectors.
        self.phi_lu = nn.Linear(channels, channels)

    def forward(self, h, v, s, u, positions, cell, batch, n_graphs):
        """
        Args:
            h: [n_atoms, F] atom scalars; v: [n_atoms, F, 3] atom vectors.
            s: [n_graphs, 3, F] lattice scalars; u: [n_graphs, 3, F, 3] lattice vectors.
            positions: [n_atoms, 3]; cell: [n_graphs, 3, 3] rows are lattice vectors.
            batch: [n_atoms] crystal index.

        Returns:
            Updated (h, v, u).
        """
        centred = positions - scatter_mean(positions, batch, n_graphs)[batch]  # [n_atoms, 3]
        lattice = cell[batch]  # [n_atoms, 3(c), 3(xyz)]
        length = safe_norm(lattice)  # [n_atoms, 3]
        parallel = (centred.unsqueeze(1) * lattice).sum(dim=-1) / length  # not einsum: see lattice_step
        cross = torch.linalg.cross(centred.unsqueeze(1).expand_as(lattice), lattice, dim=-1)
        perpendicular = safe_norm(cross) / length  # [n_atoms, 3]
        geometry = self.geometry(torch.cat([self.rbf_parallel(parallel), self.rbf_perpendicular(perpendicular)], dim=-1))  # [n_atoms, 3, F]
        toward_axis = lattice - centred.unsqueeze(1)  # [n_atoms, 3, 3]
        direction = toward_axis / safe_norm(toward_axis, eps=1e-6).unsqueeze(-1)

        h = h + (self.phi_as(h).unsqueeze(1) * geometry + self.phi_ls(s)[batch]).sum(dim=1)

        # Gate of each direction from the updated scalars and the geometry of that axis.
        direction_gate = self.phi_rv(h.unsqueeze(1) * geometry)  # [n_atoms, 3, F]
        from_directions = torch.einsum("ncf,ncx->nfx", direction_gate, direction)
        from_lattice = sum(self.w_axis[c](u[:, c]) for c in range(3))[batch]  # [n_atoms, F, 3]
        v = v + self.phi_av(h).unsqueeze(-1) * v + from_directions + from_lattice

        axis_unit = cell / safe_norm(cell).unsqueeze(-1)  # [n_graphs, 3, 3]
        u = u + self.phi_lu(s).unsqueeze(-1) * axis_unit.unsqueeze(2)
        return h, v, u
