"""The model's hyperparameters: one frozen dataclass, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def from_dict_strict(cls, values: dict, what: str):
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys (a typo must not
    silently fall back to a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys: {', '.join(unknown)}")
    return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter of E3Relax-H2 (defaults: the paper's F = 512, T = 4, D = 6, K = 50).

    Attributes:
        num_channels: F, width of scalar and vector features.
        num_layers: T, interaction layers; each yields an intermediate structure.
        cutoff: D, neighbour cutoff radius in Å.
        max_neighbors: K, at most this many nearest neighbours per atom (whole last shell kept).
        num_rbf: Gaussian radial basis functions on [0, cutoff].
        envelope_exponent: p of the polynomial envelope that takes edges smoothly to zero.
        l_max: highest spherical-harmonic degree of the H2-MP invariants.
        num_lattice_rbf: basis functions for each lattice-projection distance.
        lattice_rbf_range: the lattice-projection basis spans [-range, range] Å (parallel)
            and [0, range] Å (perpendicular).
        max_atomic_number: largest atomic number the embedding table holds.
        avg_num_neighbors: divides neighbour sums so feature scale does not grow with K.
        positions_follow_cell: carry atoms along with each layer's cell update (an affine
            map about the centroid) before adding the learned displacement. The relaxed
            volume differs from the input by tens of percent, and the affine part of that
            displacement is what a per-atom vector head learns worst.
        output_init_scale: std of the bias-free output heads at initialisation; non-zero so
            that untrained models move atoms and equivariance tests can fail.
    """

    num_channels: int = 512
    num_layers: int = 4
    cutoff: float = 6.0
    max_neighbors: int = 50
    num_rbf: int = 128
    envelope_exponent: int = 5
    l_max: int = 3
    num_lattice_rbf: int = 32
    lattice_rbf_range: float = 12.0
    max_atomic_number: int = 118
    avg_num_neighbors: float = 30.0
    positions_follow_cell: bool = True
    output_init_scale: float = 1e-2

    def __post_init__(self):
        checks = {
            "num_channels": self.num_channels > 0,
            "num_layers": self.num_layers > 0,
            "cutoff": self.cutoff > 0,
            "max_neighbors": self.max_neighbors > 0,
            "num_rbf": self.num_rbf > 0,
            "envelope_exponent": self.envelope_exponent >= 1,
            "l_max": 0 <= self.l_max <= 6,
            "num_lattice_rbf": self.num_lattice_rbf > 0,
            "lattice_rbf_range": self.lattice_rbf_range > 0,
            "max_atomic_number": self.max_atomic_number > 0,
            "avg_num_neighbors": self.avg_num_neighbors > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid ModelConfig values: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build a config, rejecting unknown keys."""
        return from_dict_strict(cls, values, "ModelConfig")
