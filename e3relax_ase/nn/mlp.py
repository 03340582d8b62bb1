"""Small multilayer perceptrons and channel-only linear maps for vector features."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> SiLU -> ... -> Linear.

    With ``bias=False`` the map sends zero to zero (SiLU(0) = 0): edge networks use that so an
    edge whose envelope is zero sends exactly nothing.
    """

    def __init__(self, dims: list[int], bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if index < len(dims) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VectorLinear(nn.Module):
    """Mixes channels of vector features [..., F_in, 3] -> [..., F_out, 3], never xyz.

    Bias-free: a bias on a vector would be a fixed direction in space and break rotation
    equivariance.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(in_channels))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...fx,gf->...gx", vectors, self.weight.to(vectors.dtype))


def safe_norm(vectors: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean norm with a finite gradient at zero."""
    return torch.sqrt(vectors.square().sum(dim=dim) + eps)
