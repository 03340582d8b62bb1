"""Lattice-node updates: atom-to-lattice aggregation and lattice-lattice mixing (steps 4-5)."""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.mlp import MLP, VectorLinear, safe_norm
from e3relax_ase.nn.radial import GaussianBasis
from e3relax_ase.nn.scatter import scatter_mean


class AtomToLattice(nn.Module):
    """Mean-pool the atoms of each crystal into its three lattice nodes.

    s_c += phi_sal(mean h (+) s_c (+) rbf(|l_c|)); u_c += tanh(gate(s_c)) * phi_val(mean v + u_c).
    The length of l_c is an input here (an addition to METHOD.md) because nothing else tells
    the lattice nodes how long their own vector is, and the lattice update needs it. The gate
    from s_c lets the three axes react differently to the same pooled atom vectors.
    """

    def __init__(self, channels: int, num_lattice_rbf: int, lattice_rbf_range: float):
        super().__init__()
        self.length_rbf = GaussianBasis(0.0, 2 * lattice_rbf_range, num_lattice_rbf)
        self.phi_sal = MLP([2 * channels + num_lattice_rbf, channels, channels])
        self.phi_val = VectorLinear(channels, channels)
        self.gate = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, h, v, s, u, cell, batch):
        n_graphs = s.shape[0]
        mean_h = scatter_mean(h, batch, n_graphs).unsqueeze(1).expand(-1, 3, -1)  # [n_graphs, 3, F]
        mean_v = scatter_mean(v, batch, n_graphs).unsqueeze(1)  # [n_graphs, 1, F, 3]
        lengths = self.length_rbf(safe_norm(cell))  # [n_graphs, 3, n_rbf]
        s = self.norm(s + self.phi_sal(torch.cat([mean_h, s, lengths], dim=-1)))
        u = u + torch.tanh(self.gate(s)).unsqueeze(-1) * self.phi_val(mean_v + u)
        return s, u


class LatticeMixing(nn.Module):
    """Mix the three lattice nodes with learnable 3x3 matrices (axis index only, never xyz)."""

    def __init__(self):
        super().__init__()
        self.mix_scalar = nn.Parameter(torch.zeros(3, 3))
        self.mix_vector = nn.Parameter(torch.zeros(3, 3))
        nn.init.normal_(self.mix_scalar, std=0.1)
        nn.init.normal_(self.mix_vector, std=0.1)

    def forward(self, s, u):
        s = s + torch.einsum("cd,gdf->gcf", self.mix_scalar.to(s.dtype), s)
        u = u + torch.einsum("cd,gdfx->gcfx", self.mix_vector.to(u.dtype), u)
        return s, u
