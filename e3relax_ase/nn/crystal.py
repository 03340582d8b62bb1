"""The crystal node: one basis-free node per crystal that talks with every atom of it.

It replaces the paper's three lattice nodes, which carry the index of a basis vector and so
see how the lattice is written. The crystal node holds scalars s [F], vectors u [F, 3] and
the crystal's strain so far; everything it exchanges with the atoms is a mean over atoms, a
rotation invariant or an equivariant product, so the same crystal written in another basis,
as a supercell or shifted gives it the same state.
"""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.mlp import MLP, VectorLinear
from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.nn.strain import matmul3


class CrystalToAtom(nn.Module):
    """Broadcast the crystal node to its atoms.

    h_i += MLP(h_i (+) phi(s));  v_i += W u + gate(h_i) * (v_i e), where e is the symmetric
    part of the strain applied so far: the atoms see how their cell has been deformed, as
    the paper's atoms see their lattice vectors, without seeing a basis.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.phi_context = nn.Linear(channels, channels)
        self.mix = MLP([2 * channels, channels, channels])
        self.w_vector = VectorLinear(channels, channels)
        self.strain_gate = nn.Linear(channels, channels)

    def forward(self, h, v, s, u, strain, batch):
        """
        Args:
            h: [n_atoms, F]; v: [n_atoms, F, 3]; s: [n_graphs, F]; u: [n_graphs, F, 3];
            strain: [n_graphs, 3, 3] symmetric; batch: [n_atoms].

        Returns:
            Updated (h, v).
        """
        context = self.phi_context(s)[batch]  # [n_atoms, F]
        h = h + self.mix(torch.cat([h, context], dim=-1))
        strained = matmul3(v, strain[batch].unsqueeze(1))  # [n_atoms, F, 3]: each v_f e
        v = v + self.w_vector(u)[batch] + self.strain_gate(h).unsqueeze(-1) * strained
        return h, v


class AtomToCrystal(nn.Module):
    """Pool the atoms into their crystal node (means: a supercell pools to its cell's values).

    s += phi_s(mean h (+) s (+) strain invariants);  u += tanh(gate(s)) * phi_u(mean v + u).
    """

    def __init__(self, channels: int, num_strain_invariants: int = 3):
        super().__init__()
        self.phi_s = MLP([2 * channels + num_strain_invariants, channels, channels])
        self.phi_u = VectorLinear(channels, channels)
        self.gate = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, h, v, s, u, invariants, batch):
        """
        Args:
            h, v: atom features; s, u: crystal features; invariants: [n_graphs, 3] of the
            strain so far (``strain.strain_invariants``); batch: [n_atoms].

        Returns:
            Updated (s, u).
        """
        n_graphs = s.shape[0]
        mean_h = scatter_mean(h, batch, n_graphs).to(s.dtype)  # [n_graphs, F]
        mean_v = scatter_mean(v, batch, n_graphs).to(u.dtype)  # [n_graphs, F, 3]
        s = self.norm(s + self.phi_s(torch.cat([mean_h, s, invariants.to(s.dtype)], dim=-1)))
        u = u + torch.tanh(self.gate(s)).unsqueeze(-1) * self.phi_u(mean_v + u)
        return s, u
