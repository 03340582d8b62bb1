"""Reusable checks for tests: random crystals, random rotations and equivariance assertions.

Library code (not under tests/) so that every test, and users who fit their own variants of
the network, check symmetry the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from e3relax_ase.config import ModelConfig
from e3relax_ase.graph import CrystalGraph, build_graph
from e3relax_ase.model import E3RelaxH2
from e3relax_ase.predict import CrystalArrays

# A small configuration for fast tests: every stage present, F and the bases shrunk.
TINY_CONFIG = ModelConfig(num_channels=16, num_layers=2, num_rbf=16, num_lattice_rbf=8, max_neighbors=24, output_init_scale=0.05)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix [3, 3] (det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_crystal(
    rng: np.random.Generator, n_atoms: int = 6, elements=(3, 8, 14, 26), min_distance: float = 1.6, skew: float = 0.3
) -> CrystalArrays:
    """A random triclinic crystal with atoms at least ``min_distance`` apart (periodic)."""
    for _ in range(1000):
        cell = np.diag(rng.uniform(3.5, 5.5, size=3)) + rng.uniform(-skew, skew, size=(3, 3)) * 3.0
        if np.linalg.det(cell) < 20.0:
            continue
        fractional = []
        for _ in range(200 * n_atoms):
            candidate = rng.uniform(0.02, 0.98, size=3)
            if not fractional or _min_periodic_distance(candidate, np.asarray(fractional), cell) >= min_distance:
                fractional.append(candidate)
            if len(fractional) == n_atoms:
                break
        if len(fractional) == n_atoms:
            positions = np.asarray(fractional) @ cell
            numbers = rng.choice(elements, size=n_atoms)
            return CrystalArrays(numbers=numbers, positions=positions, cell=cell, pbc=np.ones(3, dtype=bool))
    raise RuntimeError("could not place atoms; lower min_distance")


_IMAGES = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def _min_periodic_distance(candidate, fractional, cell) -> float:
    """Shortest distance from ``candidate`` [3] to any of ``fractional`` [m, 3] or their images."""
    diff = candidate - fractional
    diff -= np.round(diff)
    vectors = (diff[:, None, :] + _IMAGES[None]) @ cell  # [m, 27, 3]
    return float(np.sqrt((vectors**2).sum(-1).min()))


def tiny_model(seed: int = 0, config: ModelConfig = TINY_CONFIG, dtype=torch.float64) -> E3RelaxH2:
    """A randomly initialised small model with non-zero output heads, in float64."""
    torch.manual_seed(seed)
    return E3RelaxH2(config).to(dtype).eval()


def graph_of(crystals: list[CrystalArrays], config: ModelConfig, dtype=torch.float64) -> CrystalGraph:
    """The batched graph of raw (not canonicalised) crystals."""
    return build_graph(
        [torch.as_tensor(c.numbers) for c in crystals],
        [torch.as_tensor(c.positions, dtype=dtype) for c in crystals],
        [torch.as_tensor(c.cell, dtype=dtype) for c in crystals],
        [torch.as_tensor(c.pbc) for c in crystals],
        config.cutoff,
        config.max_neighbors,
    )


def assert_rotation_equivariant(model: E3RelaxH2, crystal: CrystalArrays, rotations, atol: float = 1e-9) -> None:
    """Rotating the input rotates every layer's positions and lattice rows (model level).

    Raises:
        AssertionError: naming the layer and the largest deviation.
    """
    config = model.config
    with torch.no_grad():
        reference = model(graph_of([crystal], config))
        for rotation in rotations:
            rotated = CrystalArrays(crystal.numbers, crystal.positions @ rotation.T, crystal.cell @ rotation.T, crystal.pbc)
            output = model(graph_of([rotated], config))
            rot = torch.as_tensor(rotation, dtype=output.positions.dtype)
            pos_error = (output.positions - reference.positions @ rot.T).abs().max().item()
            cell_error = (output.cell - reference.cell @ rot.T).abs().max().item()
            if pos_error > atol or cell_error > atol:
                raise AssertionError(f"not rotation equivariant: positions off by {pos_error:.3g} Å, cell off by {cell_error:.3g} Å")
