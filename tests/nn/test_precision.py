"""Reduced-precision inference (e3relax_ase.nn.precision): the geometry stays float32, the
deviation from float32 stays small, and the options are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from e3relax_ase.geometry.graph import edge_vectors
from e3relax_ase.nn.precision import check_precision, matmul_precision
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import TINY_CONFIG, graph_of, random_crystal, tiny_model


def test_geometry_is_not_rounded_by_bf16_autocast():
    """Edge vectors of a large cell under autocast equal float32's bit for bit: an einsum there
    would be computed in bfloat16 and misplace periodic images by ~0.04 Å."""
    rng = np.random.default_rng(3)
    crystal = random_crystal(rng, n_atoms=5)
    crystal.cell = crystal.cell * 3.0  # 10-17 Å vectors, where bfloat16 rounding is ~0.05 Å
    crystal.positions = crystal.positions * 3.0
    graph = graph_of([crystal], TINY_CONFIG, dtype=torch.float32)
    exact = edge_vectors(graph, graph.positions, graph.cell)
    with matmul_precision("bf16", "cpu"):
        autocast = edge_vectors(graph, graph.positions, graph.cell)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, exact)


def test_bf16_model_output_stays_float32_and_close():
    model = tiny_model(dtype=torch.float32)
    rng = np.random.default_rng(0)
    graph = graph_of([random_crystal(rng, n_atoms=6) for _ in range(3)], model.config, dtype=torch.float32)
    with torch.no_grad():
        exact = model(graph)
        with matmul_precision("bf16", "cpu"):
            reduced = model(graph)
    assert reduced.positions.dtype == torch.float32 and reduced.cell.dtype == torch.float32
    moved = (exact.positions[-1] - graph.positions).norm(dim=-1).max()
    deviation = (reduced.positions[-1] - exact.positions[-1]).norm(dim=-1).max()
    assert deviation > 0  # autocast really ran in bfloat16
    assert deviation < 0.05 * moved + 1e-3


def test_relaxer_precision_options():
    atoms = bulk("Si", "diamond", a=5.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    exact = OneShotRelaxer("default", device="cpu", dtype="float32").relax(atoms)
    tf32 = OneShotRelaxer("default", device="cpu", dtype="float32", precision="tf32").relax(atoms)
    bf16_relaxer = OneShotRelaxer("default", device="cpu", dtype="float32", precision="bf16")
    bf16 = bf16_relaxer.relax(atoms)
    # TF32 exists on CUDA only: on a CPU the result is float32's, bit for bit.
    assert np.array_equal(tf32.positions, exact.positions)
    assert np.abs(bf16.positions - exact.positions).max() < 0.05
    assert np.abs(bf16.cell.array - exact.cell.array).max() < 0.05
    assert bf16.info["e3relax_precision"] == "bf16" and "e3relax_precision" not in exact.info
    assert "precision='bf16'" in repr(bf16_relaxer)
    with pytest.raises(ValueError, match="needs dtype float32"):
        OneShotRelaxer("default", device="cpu", dtype="float64", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp8", torch.float32)


def test_tf32_switch_is_restored():
    before = torch.get_float32_matmul_precision()
    with matmul_precision("tf32", "cuda"):  # sets the switch even without a GPU present
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
