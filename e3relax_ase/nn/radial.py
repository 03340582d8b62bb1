"""Radial bases and the cutoff envelope."""

from __future__ import annotations

import torch
from torch import nn


class GaussianBasis(nn.Module):
    """Gaussians with centres evenly spaced on [start, stop] and width equal to the spacing."""

    centers: torch.Tensor  # buffers (register_buffer)
    inv_width: torch.Tensor

    def __init__(self, start: float, stop: float, num_basis: int):
        super().__init__()
        centers = torch.linspace(start, stop, num_basis)
        width = (stop - start) / max(num_basis - 1, 1)
        self.register_buffer("centers", centers)
        self.register_buffer("inv_width", torch.tensor(1.0 / width))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """[...] -> [..., num_basis]"""
        scaled = (distances.unsqueeze(-1) - self.centers.to(distances.dtype)) * self.inv_width.to(distances.dtype)
        return torch.exp(-0.5 * scaled.square())


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff u(d/D): 1 at 0, zero with p continuous derivatives... at and beyond D.

    u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x < 1, else 0.
    Multiplying every edge quantity by it makes a neighbour's influence vanish continuously as
    it crosses the cutoff, so the prediction is a continuous function of the input geometry.
    """

    def __init__(self, cutoff: float, exponent: int):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(exponent)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        x = distances / self.cutoff
        p = self.p
        u = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return torch.where(x < 1, u, torch.zeros_like(u))
