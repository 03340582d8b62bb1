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


# The two lattice designs a checkpoint can hold (docs/method.md, "Lattice"):
#   "strain": one basis-free crystal node whose cell update is a symmetric strain pooled from
#       equivariant tensors. The prediction depends on the crystal only, not on how it is written.
#   "axis-lattice": the paper's three lattice nodes, one per basis vector. Kept to load
#       checkpoints trained before "strain" (format version 1); it sees the basis.
ARCHITECTURES = ("strain", "axis-lattice")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter of E3Relax-H2 (defaults: the paper's F = 512, T = 4, D = 6, K = 50).

    Attributes:
        architecture: the lattice design, one of ``ARCHITECTURES``.
        num_channels: F, width of scalar and vector features.
        num_layers: T, interaction layers; each yields an intermediate structure.
        cutoff: D, neighbour cutoff radius in Å.
        max_neighbors: K, at most this many nearest neighbours per atom (whole last shell kept).
        num_rbf: Gaussian radial basis functions on [0, cutoff].
        envelope_exponent: p of the polynomial envelope that takes edges smoothly to zero.
        l_max: highest spherical-harmonic degree of the H2-MP invariants.
        num_strain_channels: "strain" only: channels of each kind of pooled tensor (edge
            directions, atom vectors, crystal vectors) the strain head combines.
        max_strain_step: "strain" only: the largest strain step of one layer (Frobenius norm;
            larger raw outputs are shrunk smoothly), so that no layer inverts a cell.
        num_lattice_rbf: "axis-lattice" only: basis functions for each lattice-projection
            distance.
        lattice_rbf_range: "axis-lattice" only: the lattice-projection basis spans
            [-range, range] Å (parallel) and [0, range] Å (perpendicular).
        max_atomic_number: largest atomic number the embedding table holds.
        avg_num_neighbors: divides neighbour sums so feature scale does not grow with K.
        positions_follow_cell: "axis-lattice" only: carry atoms along with each layer's cell
            update (an affine map about the centroid) before adding the learned displacement.
            "strain" always carries them (fractional coordinates are kept by the strain).
        output_init_scale: std of the bias-free output heads at initialisation; non-zero so
            that untrained models move atoms and equivariance tests can fail.
    """

    architecture: str = "strain"
    num_channels: int = 512
    num_layers: int = 4
    cutoff: float = 6.0
    max_neighbors: int = 50
    num_rbf: int = 128
    envelope_exponent: int = 5
    l_max: int = 3
    num_strain_channels: int = 8
    max_strain_step: float = 0.3
    num_lattice_rbf: int = 32
    lattice_rbf_range: float = 12.0
    max_atomic_number: int = 118
    avg_num_neighbors: float = 30.0
    positions_follow_cell: bool = True
    output_init_scale: float = 1e-2

    def __post_init__(self):
        checks = {
            "architecture": self.architecture in ARCHITECTURES,
            "num_strain_channels": self.num_strain_channels > 0,
            "max_strain_step": 0 < self.max_strain_step < 1,
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
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build a config, rejecting unknown keys."""
        return from_dict_strict(cls, values, "ModelConfig")
