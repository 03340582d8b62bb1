"""The cell update as a strain: symmetric tensors pooled over a crystal, and their restriction
to the periodic directions of a slab.

A strain is a Cartesian rank-2 tensor, so it does not depend on which basis vectors describe
the lattice: the cell update L' = L (I + e) of any basis M L of the same lattice is M L', the
same lattice. Pooled as a mean over atoms it is the same for a cell and its supercells, and a
symmetric e built from equivariant features commutes with every point-group operation of a
symmetric crystal, so the strained lattice keeps that symmetry. Symmetric tensors travel as
their six components in ``SYM6`` order.
"""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.nn.solve import solve_unchecked

# Components of a symmetric 3x3 tensor: xx, yy, zz, xy, xz, yz.
SYM6 = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
# Weight of each component in the Frobenius norm (off-diagonal ones appear twice).
_SYM6_NORM_WEIGHTS = (1.0, 1.0, 1.0, 2.0, 2.0, 2.0)


def matmul3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for [..., 3, 3] (or [..., 3] rows times [..., 3, 3]) written elementwise.

    Geometry is computed this way throughout the network: under bfloat16 autocast a matrix
    product would round 10 Å coordinates to ~0.04 Å, while elementwise products keep their
    inputs' float32.
    """
    if a.dim() == b.dim() - 1:  # rows: sum_k a_k b_k.
        return a[..., 0:1] * b[..., 0, :] + a[..., 1:2] * b[..., 1, :] + a[..., 2:3] * b[..., 2, :]
    return a[..., :, 0:1] * b[..., 0:1, :] + a[..., :, 1:2] * b[..., 1:2, :] + a[..., :, 2:3] * b[..., 2:3, :]


def sym6_outer(vectors: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 6]: the components of vectors (x) vectors."""
    return torch.stack([vectors[..., a] * vectors[..., b] for a, b in SYM6], dim=-1)


def sym6_weighted_outer(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[..., F, 3] x [K, F] -> [..., K, 6]: sum_f weights[k, f] v_f (x) v_f.

    Elementwise products, then a channel sum as a matrix product: under bfloat16 autocast
    the product v_a v_b stays in the features' precision and only the learned channel
    combination is rounded.
    """
    products = torch.stack([vectors[..., a] * vectors[..., b] for a, b in SYM6], dim=-1)  # [..., F, 6]
    return torch.matmul(weights.to(products.dtype), products)


def sym6_to_matrix(components: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [..., 3, 3] symmetric."""
    xx, yy, zz, xy, xz, yz = components.unbind(-1)
    return torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1), torch.stack([xz, yz, zz], -1)], -2)


def sym6_norm(components: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [...]: the Frobenius norm of the symmetric tensor (rotation invariant)."""
    weights = components.new_tensor(_SYM6_NORM_WEIGHTS)
    return torch.sqrt((components.square() * weights).sum(-1) + 1e-12)


def strain_invariants(strain: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 3]: tr e, tr e^2, tr e^3 of the symmetric part e of ``strain``.

    Rotation invariants that tell the crystal node how far its cell has been strained.
    """
    e = 0.5 * (strain + strain.transpose(-1, -2))
    e2 = matmul3(e, e)
    trace = e.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace2 = e2.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace3 = (e2 * e.transpose(-1, -2)).sum((-1, -2))
    return torch.stack([trace, trace2, trace3], dim=-1)


class StrainHead(nn.Module):
    """Each crystal's strain step, a symmetric tensor from its pooled equivariant features.

    e = a(s) I + sum_k b_k(s) T_k, where the crystal scalars s give the coefficients and the
    T_k are symmetric tensors of three kinds, each with ``num_channels`` channels:
      - the mean over atoms of the edge tensors of the message passing, sum_j w(m_ji) d (x) d
        (a learned, many-body analogue of the virial);
      - the mean over atoms of channel-weighted products v_f (x) v_f of atom vector features;
      - the crystal node's vector features, u_f (x) u_f.
    Means over atoms make the step intensive: a supercell gets the step of its cell. The step
    is finally shrunk by its (rotation-invariant) norm to at most ``max_step``, so a layer
    can never invert or collapse the cell however large its raw output.
    """

    def __init__(self, channels: int, num_channels: int, max_step: float, init_scale: float):
        super().__init__()
        self.max_step = float(max_step)
        self.atom_weights = nn.Parameter(torch.randn(num_channels, channels) / channels**0.5)
        self.crystal_weights = nn.Parameter(torch.randn(num_channels, channels) / channels**0.5)
        # One isotropic coefficient, then one per tensor channel; small at initialisation so an
        # untrained network strains little, non-zero so symmetry tests can fail.
        self.coefficients = nn.Linear(channels, 1 + 3 * num_channels)
        nn.init.normal_(self.coefficients.weight, std=init_scale / channels**0.5)
        nn.init.zeros_(self.coefficients.bias)

    def forward(self, s, v, u, edge_tensors, batch) -> torch.Tensor:
        """
        Args:
            s: [n_graphs, F] crystal scalars; v: [n_atoms, F, 3] atom vectors;
            u: [n_graphs, F, 3] crystal vectors; edge_tensors: [n_atoms, K, 6] (``H2MessagePassing``);
            batch: [n_atoms].

        Returns:
            [n_graphs, 3, 3] the symmetric strain step.
        """
        n_graphs = s.shape[0]
        per_atom = torch.cat([edge_tensors.to(v.dtype), sym6_weighted_outer(v, self.atom_weights).to(v.dtype)], dim=1)
        pooled = scatter_mean(per_atom, batch, n_graphs).to(v.dtype)  # [n_graphs, 2K, 6]
        tensors = torch.cat([pooled, sym6_weighted_outer(u, self.crystal_weights).to(v.dtype)], dim=1)  # [n_graphs, 3K, 6]
        coefficients = self.coefficients(s).to(v.dtype)  # [n_graphs, 1 + 3K]
        step = (coefficients[:, 1:, None] * tensors).sum(dim=1)  # [n_graphs, 6]
        isotropic = coefficients[:, :1] * step.new_tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
        step = step + isotropic
        norm = sym6_norm(step)
        step = step * (self.max_step * torch.tanh(norm / self.max_step) / norm).unsqueeze(-1)
        return sym6_to_matrix(step)


class PeriodicRestriction:
    """Restricts a Cartesian strain step to a crystal's periodic directions.

    A 3D-periodic crystal takes the step as it is. A slab (or a chain) is strained only
    within the span of its periodic lattice vectors, and its non-periodic lattice vectors are
    kept: the increment D of the deformation F = I + E (cell = cell_in F) is
    D = cell_in^-1 mask(cell_in P e P), with P the projector onto the periodic span and mask
    zeroing the rows of non-periodic vectors. Rotating the input rotates D like e; D depends
    on the vacuum vector the user chose, which no crystal property fixes anyway.
    """

    def __init__(self, cell: torch.Tensor, pbc: torch.Tensor):
        """cell: [n_graphs, 3, 3] the input cells; pbc: [n_graphs, 3] bool."""
        mask = pbc.to(cell.dtype)  # [n_graphs, 3]
        periodic_rows = cell * mask.unsqueeze(-1)  # B: non-periodic rows zeroed
        gram = matmul3(periodic_rows, periodic_rows.transpose(-1, -2)) + torch.diag_embed(1.0 - mask)
        self.projector = matmul3(periodic_rows.transpose(-1, -2), solve_unchecked(gram, periodic_rows))
        identity = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        self.left = matmul3(solve_unchecked(cell, identity), matmul3(periodic_rows, self.projector))  # cell_in^-1 mask(cell_in P)
        self.fully_periodic = pbc.all(dim=-1)[:, None, None]  # [n_graphs, 1, 1]

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        """[n_graphs, 3, 3] strain step -> increment of the deformation, same shape."""
        restricted = matmul3(matmul3(self.left.to(step.dtype), step), self.projector.to(step.dtype))
        # Exact where periodic in 3D (no round trip through cell_in^-1 cell_in).
        return torch.where(self.fully_periodic, step, restricted)
