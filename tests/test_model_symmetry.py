"""Symmetry and continuity of E3Relax-H2, in float64 with random weights and non-zero heads.

Each test compares against a change that a broken model would get wrong; see
test_column_lattice_update_fails_rotation_test for the authors' lattice bug being caught.
"""

import numpy as np
import pytest
import torch

from e3relax_ase.config import ModelConfig
from e3relax_ase.graph import CrystalGraph
from e3relax_ase.model import E3RelaxH2, InteractionLayer
from e3relax_ase.predict import CrystalArrays, predict
from e3relax_ase.testing import TINY_CONFIG, assert_rotation_equivariant, graph_of, random_crystal, random_rotation, tiny_model


def _run(model, crystals):
    with torch.no_grad():
        return model(graph_of(crystals, model.config))


def test_output_moves_atoms_and_cell(model, crystal):
    out = _run(model, [crystal])
    assert (out.positions[-1] - torch.tensor(crystal.positions)).abs().max() > 1e-3
    assert (out.cell[-1] - torch.tensor(crystal.cell)).abs().max() > 1e-3
    assert out.positions.shape == (TINY_CONFIG.num_layers, 6, 3)
    assert out.cell.shape == (TINY_CONFIG.num_layers, 1, 3, 3)


def test_rotation_equivariance_several_rotations(model, rng):
    for _ in range(3):
        crystal = random_crystal(rng, n_atoms=5)
        assert_rotation_equivariant(model, crystal, [random_rotation(rng) for _ in range(4)], atol=1e-9)


def test_column_lattice_update_fails_rotation_test(model, crystal, rng, monkeypatch):
    """Writing axis c's update into column c (the authors' bug) must be caught."""
    original = InteractionLayer.lattice_step
    monkeypatch.setattr(InteractionLayer, "lattice_step", lambda self, u: original(self, u).transpose(-1, -2))
    with pytest.raises(AssertionError, match="not rotation equivariant"):
        assert_rotation_equivariant(model, crystal, [random_rotation(rng)], atol=1e-9)


def test_translation_moves_positions_keeps_lattice(model, crystal, rng):
    graph = graph_of([crystal], model.config)
    shift = torch.tensor(rng.normal(size=3) * 3.0)
    moved = CrystalGraph(**{**graph.__dict__, "positions": graph.positions + shift})
    with torch.no_grad():
        a, b = model(graph), model(moved)
    assert torch.allclose(b.positions, a.positions + shift, atol=1e-10)
    assert torch.allclose(b.cell, a.cell, atol=1e-10)


def test_permutation_permutes_output(model, crystal, rng):
    perm = rng.permutation(len(crystal.numbers))
    permuted = CrystalArrays(crystal.numbers[perm], crystal.positions[perm], crystal.cell, crystal.pbc)
    a, b = _run(model, [crystal]), _run(model, [permuted])
    assert torch.allclose(b.positions, a.positions[:, perm], atol=1e-10)
    assert torch.allclose(b.cell, a.cell, atol=1e-10)


def test_wrapping_an_atom_changes_only_that_atom_by_the_predicted_lattice_vector(model, crystal):
    base = predict(model, [crystal], dtype=torch.float64)[0]
    for axis, sign in ((0, 1), (1, -1), (2, 2)):
        moved_positions = crystal.positions.copy()
        moved_positions[2] += sign * crystal.cell[axis]
        moved = predict(model, [CrystalArrays(crystal.numbers, moved_positions, crystal.cell, crystal.pbc)], dtype=torch.float64)[0]
        np.testing.assert_allclose(moved.cell, base.cell, atol=1e-10)
        expected = base.positions.copy()
        expected[:, 2] += sign * base.cell[:, axis]
        np.testing.assert_allclose(moved.positions, expected, atol=1e-10)


def test_cell_choice_invariance(model, crystal):
    """A different basis of the same lattice gives the same relaxed crystal, in that basis."""
    base = predict(model, [crystal], dtype=torch.float64)[0]
    transform = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])  # unimodular
    other_cell = transform @ crystal.cell
    other = predict(model, [CrystalArrays(crystal.numbers, crystal.positions, other_cell, crystal.pbc)], dtype=torch.float64)[0]
    np.testing.assert_allclose(other.cell, transform @ base.cell, atol=1e-9)
    np.testing.assert_allclose(other.positions, base.positions, atol=1e-9)


def test_pipeline_rotation_equivariance(model, crystal, rng):
    base = predict(model, [crystal], dtype=torch.float64)[0]
    rotation = random_rotation(rng)
    rotated = CrystalArrays(crystal.numbers, crystal.positions @ rotation.T, crystal.cell @ rotation.T, crystal.pbc)
    out = predict(model, [rotated], dtype=torch.float64)[0]
    np.testing.assert_allclose(out.positions, base.positions @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(out.cell, base.cell @ rotation.T, atol=1e-9)


def test_batch_equals_one_by_one(model, rng):
    crystals = [random_crystal(rng, n_atoms=n) for n in (3, 6, 4)]
    together = predict(model, crystals, dtype=torch.float64)
    for crystal, joint in zip(crystals, together):
        alone = predict(model, [crystal], dtype=torch.float64)[0]
        np.testing.assert_allclose(joint.positions, alone.positions, atol=1e-12)
        np.testing.assert_allclose(joint.cell, alone.cell, atol=1e-12)


def _pair_in_box(separation: float) -> CrystalArrays:
    cell = np.diag([20.0, 20.0, 20.0])
    positions = np.array([[5.0, 5.0, 5.0], [5.0 + separation, 5.0, 5.0]])
    return CrystalArrays(np.array([8, 14]), positions, cell, np.ones(3, dtype=bool))


def test_atom_crossing_cutoff_changes_output_continuously(model):
    cutoff = model.config.cutoff
    def final(sep):
        out = _run(model, [_pair_in_box(sep)])
        return torch.cat([out.positions[-1].flatten(), out.cell[-1].flatten()])
    delta = 1e-6
    jump = (final(cutoff - delta) - final(cutoff + delta)).abs().max().item()
    smooth = (final(cutoff + delta) - final(cutoff + 3 * delta)).abs().max().item()
    assert jump <= 5 * smooth + 1e-12, (jump, smooth)
    # and the pair does interact well inside the cutoff
    inside = (final(cutoff - 1.0) - final(cutoff + 1.0)).abs().max().item()
    assert inside > 1e3 * max(jump, 1e-12)


def test_edge_beyond_cutoff_sends_nothing(model):
    crystal = _pair_in_box(7.0)
    graph = graph_of([crystal], model.config)
    assert graph.n_edges == 0
    forced = CrystalGraph(**{
        **graph.__dict__,
        "edge_src": torch.tensor([1, 0]),
        "edge_dst": torch.tensor([0, 1]),
        "edge_shift": torch.zeros(2, 3, dtype=torch.float64),
    })
    with torch.no_grad():
        a, b = model(graph), model(forced)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.cell, b.cell)


def test_vacuum_axis_never_stretched(model, rng):
    crystal = random_crystal(rng, n_atoms=4)
    cell = crystal.cell.copy()
    cell[2] = [0.0, 0.0, 25.0]
    slab = CrystalArrays(crystal.numbers, crystal.positions, cell, np.array([True, True, False]))
    out = predict(model, [slab], dtype=torch.float64)[0]
    np.testing.assert_array_equal(out.cell[:, 2], np.broadcast_to(cell[2], (model.config.num_layers, 3)))
    assert np.abs(out.cell[-1, :2] - cell[:2]).max() > 1e-4


def test_parameter_count_pinned():
    assert tiny_model().count_parameters() == 18996
    assert E3RelaxH2(ModelConfig()).count_parameters() == 30985320


def test_float32_matches_float64(model, crystal):
    out64 = predict(model, [crystal], dtype=torch.float64)[0]
    out32 = predict(model.float(), [crystal], dtype=torch.float32)[0]
    np.testing.assert_allclose(out32.positions, out64.positions, atol=1e-4)


def test_prediction_keeps_the_inputs_fractional_centroid(model, crystal, rng):
    """Output convention: the rigid translation is that of DFT codes (fractional centroid kept)."""
    out = predict(model, [crystal], dtype=torch.float64)[0]
    frac_in = np.linalg.solve(crystal.cell.T, crystal.positions.T).T.mean(0)
    frac_out = np.linalg.solve(out.cell[-1].T, out.positions[-1].T).T.mean(0)
    np.testing.assert_allclose(frac_out, frac_in, atol=1e-10)
    # so translating the input by t translates the output by t L_in^-1 L_pred
    shift = rng.normal(size=3) * 0.01  # small: no atom crosses a cell face
    moved = predict(model, [CrystalArrays(crystal.numbers, crystal.positions + shift, crystal.cell, crystal.pbc)], dtype=torch.float64)[0]
    expected = shift @ np.linalg.solve(crystal.cell, out.cell[-1])
    np.testing.assert_allclose(moved.positions[-1] - out.positions[-1], np.broadcast_to(expected, out.positions[-1].shape), atol=1e-9)
    np.testing.assert_allclose(moved.cell, out.cell, atol=1e-10)


@pytest.mark.parametrize("l_max", [0, 1, 3, 6])
def test_h2mp_invariants_are_the_summed_products_of_spherical_harmonics(l_max):
    """z_l by the addition theorem equals sum_m Y_lm(a) Y_lm(b) of e3nn's unnormalised
    component-normalised harmonics (the definition in METHOD.md), for any lengths of a and b,
    the zero reference of a centrosymmetric site included."""
    from e3nn import o3

    from e3relax_ase.nn.h2mp import H2MessagePassing

    layer = H2MessagePassing(8, 4, 6.0, 5, l_max, 20.0).double()
    harmonics = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(l_max), normalize=False, normalization="component")
    generator = torch.Generator().manual_seed(l_max)
    a = torch.randn(500, 3, dtype=torch.float64, generator=generator)
    a = a / a.norm(dim=-1, keepdim=True) * (1 - 1e-13)  # safe_norm's directions are a hair short of unit
    b = torch.randn(500, 3, dtype=torch.float64, generator=generator) * torch.rand(500, 1, dtype=torch.float64, generator=generator)
    b[:5] = 0.0
    product = harmonics(a) * harmonics(b)
    degrees = torch.cat([torch.full((2 * l + 1,), l) for l in range(l_max + 1)])
    expected = torch.zeros(500, l_max + 1, dtype=torch.float64).index_add_(1, degrees, product)
    got = layer.invariants(a, b)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
