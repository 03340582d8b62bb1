"""Self-interaction: mix each atom's aggregated scalar and vector messages (layer step 3)."""

from __future__ import annotations

import torch
from torch import nn

from e3relax_ase.nn.mlp import MLP, VectorLinear, safe_norm


class SelfInteraction(nn.Module):
    """q = m (+) |U mv|;  h += phi_s1(q) + tanh(phi_s2(q)) * m;  v += phi_v(q) * (V mv).

    The updates are residual and the scalars are layer-normalised afterwards; METHOD.md writes
    the update as an assignment, and the residual form trains more stably at depth.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.u = VectorLinear(channels, channels)
        self.v = VectorLinear(channels, channels)
        self.phi_s1 = MLP([2 * channels, channels, channels])
        self.phi_s2 = nn.Linear(2 * channels, channels)
        self.phi_v = nn.Linear(2 * channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, h, v, m, mv):
        q = torch.cat([m, safe_norm(self.u(mv))], dim=-1)  # [n_atoms, 2F]
        h = self.norm(h + self.phi_s1(q) + torch.tanh(self.phi_s2(q)) * m)
        v = v + self.phi_v(q).unsqueeze(-1) * self.v(mv)
        return h, v
