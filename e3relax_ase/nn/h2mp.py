"""H2-MP: high-degree, high-order message passing between atoms (METHOD.md, layer step 2)."""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.mlp import MLP, safe_norm
from e3relax_ase.nn.radial import GaussianBasis, PolynomialEnvelope
from e3relax_ase.nn.scatter import scatter_sum
from e3relax_ase.nn.strain import sym6_outer


class H2MessagePassing(nn.Module):
    """Atom-atom messages gated by many-body angular invariants.

    Each atom's local reference direction is the envelope-weighted sum of its incoming edge
    directions. For each edge and each degree l <= l_max the invariant
    z_l = sum_m Y_lm(edge direction) Y_lm(reference) compares the edge with the whole
    neighbourhood. The reference is soft-normalised, ref = s / sqrt(|s|^2 + 1), and the
    harmonics are the unnormalised (polynomial) ones, so z_l scales as |ref|^l: in a site
    whose incoming directions cancel (a centrosymmetric site) the reference direction is
    undefined, and z_l for l >= 1 then fades to zero instead of jumping with rounding noise.

    The sum over m is computed by the addition theorem rather than from the harmonics: for
    the component-normalised real harmonics (e3nn's "component"), unnormalised,
    sum_m Y_lm(a) Y_lm(b) = (2l + 1) |a|^l |b|^l P_l(a.b / |a||b|), a polynomial in a.b and
    |a|^2 |b|^2 that Legendre's recurrence gives in a few elementwise operations per degree.
    The same numbers to rounding (tests/nn/test_model_symmetry.py checks it against e3nn's
    harmonics); in place of the two harmonics evaluations per layer, whose ~100 small kernels
    each were a large share of the time the host spent launching a forward pass.
    """

    def __init__(
        self,
        channels: int,
        num_rbf: int,
        cutoff: float,
        envelope_exponent: int,
        l_max: int,
        avg_num_neighbors: float,
        num_tensor_channels: int = 0,
    ):
        super().__init__()
        self.l_max = l_max
        self.rbf = GaussianBasis(0.0, cutoff, num_rbf)
        self.envelope = PolynomialEnvelope(cutoff, envelope_exponent)
        self.norm_invariants = nn.LayerNorm(l_max + 1)
        self.gate = MLP([l_max + 1, channels, channels])
        # Bias-free so that a zero envelope gives an exactly zero message.
        self.radial = MLP([num_rbf, channels, channels], bias=False)
        self.phi_h = nn.Linear(channels, channels)
        self.phi_m = nn.Linear(channels, channels, bias=False)
        self.phi_hv = nn.Linear(channels, channels, bias=False)
        self.phi_rv = nn.Linear(channels, channels, bias=False)
        self.inv_avg_neighbors = 1.0 / avg_num_neighbors
        # Each edge's share of the atom's rank-2 tensor: the basis-free raw material of the
        # strain (nn/strain.py), like a pair term of the virial. None when not asked for.
        self.phi_tensor = nn.Linear(channels, num_tensor_channels, bias=False) if num_tensor_channels else None

    def invariants(self, edge_dir: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """[n_edges, 3] x [n_edges, 3] -> [n_edges, l_max + 1] of sum_m Y_lm(a) Y_lm(b) (class docstring).

        With t = a.b and q = |a|^2 |b|^2, Q_l = |a|^l |b|^l P_l(t / sqrt(q)) follows
        Q_0 = 1, Q_1 = t, (l + 1) Q_{l+1} = (2l + 1) t Q_l - l q Q_{l-1}, and z_l = (2l + 1) Q_l.
        """
        t = (edge_dir * reference).sum(dim=-1)
        q = edge_dir.square().sum(dim=-1) * reference.square().sum(dim=-1)
        previous, current = torch.ones_like(t), t
        z = [previous, 3.0 * current][: self.l_max + 1]
        for l in range(1, self.l_max):
            previous, current = current, ((2 * l + 1) * t * current - l * q * previous) / (l + 1)
            z.append((2 * l + 3) * current)
        return torch.stack(z, dim=-1)

    def forward(self, h, v, edge_vec, edge_src, edge_dst):
        """
        Args:
            h: [n_atoms, F]; v: [n_atoms, F, 3].
            edge_vec: [n_edges, 3] from receiver to sender image (keys.py convention).
            edge_src, edge_dst: [n_edges].

        Returns:
            (m [n_atoms, F] scalar aggregate, mv [n_atoms, F, 3] vector aggregate,
            t [n_atoms, K, 6] the symmetric tensors sum_j w_k(m_ji) d_ji (x) d_ji of the edge
            directions d_ji in ``strain.SYM6`` order, or None without tensor channels).
        """
        n_atoms = h.shape[0]
        distance = safe_norm(edge_vec)  # [n_edges]
        edge_dir = edge_vec / distance.unsqueeze(-1)
        envelope = self.envelope(distance)  # [n_edges]

        summed = scatter_sum(envelope.unsqueeze(-1) * edge_dir, edge_dst, n_atoms)  # [n_atoms, 3]
        reference = summed / torch.sqrt(summed.square().sum(-1, keepdim=True) + 1.0)
        z = self.invariants(edge_dir, reference[edge_dst])  # [n_edges, l_max + 1]
        gate = torch.tanh(self.gate(self.norm_invariants(z)))  # [n_edges, F]

        radial = envelope.unsqueeze(-1) * self.radial(self.rbf(distance) * envelope.unsqueeze(-1))
        message = gate * self.phi_h(h)[edge_src] * radial  # [n_edges, F]

        # phi_m is linear and bias-free, so it is applied to each atom's summed messages
        # instead of to every edge's: the same sum, with one edge-sized matrix product fewer.
        summed_messages = scatter_sum(message, edge_dst, n_atoms)
        m = self.phi_m(summed_messages).to(summed_messages.dtype) * self.inv_avg_neighbors
        # phi_hv and phi_rv read the same messages: one product with the stacked weights reads
        # them once. The vector message is built in place (addcmul_): one pass fewer, and one
        # [n_edges, F, 3] buffer fewer at the peak than a sum of two products.
        hv, rv = nn.functional.linear(message, torch.cat([self.phi_hv.weight, self.phi_rv.weight])).chunk(2, dim=-1)
        vector_message = (rv.unsqueeze(-1) * edge_dir.unsqueeze(1)).addcmul_(hv.unsqueeze(-1), v[edge_src])
        mv = scatter_sum(vector_message, edge_dst, n_atoms) * self.inv_avg_neighbors  # [n_atoms, F, 3]
        if self.phi_tensor is None:
            return m, mv, None
        # The message already carries the envelope (radial), so an edge crossing the cutoff
        # leaves the tensor continuously, as it leaves m.
        tensor = self.phi_tensor(message).unsqueeze(-1) * sym6_outer(edge_dir).unsqueeze(1)  # [n_edges, K, 6]
        t = scatter_sum(tensor, edge_dst, n_atoms) * self.inv_avg_neighbors  # [n_atoms, K, 6]
        return m, mv, t
