"""One crystal, one answer: symmetry, invariance and continuity of E3Relax-H2, in float64 with
random weights and non-zero heads (the shipped checkpoints: test_shipped_checkpoint.py).

Every check is the public test kit's (e3relax_ase/testing.py); the tests on the paper's
"axis-lattice" network show that each check fails on a network that sees how the crystal
is written.
"""

import numpy as np
import pytest
import torch

from e3relax_ase.config import ModelConfig
from e3relax_ase.geometry.graph import CrystalGraph
from e3relax_ase.nn.architectures import build_model
from e3relax_ase.nn.model import E3RelaxH2
from e3relax_ase.nn.model_axis_lattice import InteractionLayer as AxisLatticeLayer
from e3relax_ase.relax.predict import CrystalArrays, predict
from e3relax_ase.testing import (
    TINY_CONFIG,
    assert_basis_invariant,
    assert_face_grazing_invariant,
    assert_o3_equivariant,
    assert_one_crystal_one_answer,
    assert_rotation_equivariant,
    assert_same_volume_per_atom,
    assert_space_group_kept,
    assert_supercell_invariant,
    assert_translation_invariant,
    graph_of,
    network_predictor,
    pipeline_predictor,
    prototypes,
    random_crystal,
    random_rotation,
    random_unimodular,
    supercell,
    tiny_model,
)

AXIS_LATTICE_CONFIG = ModelConfig(
    architecture="axis-lattice", num_channels=16, num_layers=2, num_rbf=16, num_lattice_rbf=8, max_neighbors=24, output_init_scale=0.05
)


@pytest.fixture
def axis_lattice_model():
    torch.manual_seed(0)
    return build_model(AXIS_LATTICE_CONFIG).double().eval()


def _run(model, crystals):
    with torch.no_grad():
        return model(graph_of(crystals, model.config))


def test_output_moves_atoms_and_cell(model, crystal):
    out = _run(model, [crystal])
    assert (out.positions[-1] - torch.tensor(crystal.positions)).abs().max() > 1e-3
    assert (out.cell[-1] - torch.tensor(crystal.cell)).abs().max() > 1e-3
    assert out.positions.shape == (TINY_CONFIG.num_layers, 6, 3)
    assert out.cell.shape == (TINY_CONFIG.num_layers, 1, 3, 3)


@pytest.mark.parametrize("level", ["network", "pipeline"])
def test_one_crystal_one_answer_random_weights(level, rng):
    """Basis, supercells, translations across faces, images, face-grazing atoms, rotations,
    reflections and permutations, on several random crystals and two random networks."""
    for seed in (0, 1):
        model = tiny_model(seed)
        predictor = network_predictor(model) if level == "network" else pipeline_predictor(model)
        for n_atoms in (1, 3, 5):
            assert_one_crystal_one_answer(predictor, random_crystal(rng, n_atoms=n_atoms), rng)


def test_every_layer_is_rotation_equivariant(model, rng):
    for _ in range(2):
        crystal = random_crystal(rng, n_atoms=5)
        assert_rotation_equivariant(model, crystal, [random_rotation(rng) for _ in range(3)], atol=1e-9)


def test_supercell_helper_copies_every_atom_once(rng):
    crystal = random_crystal(rng, n_atoms=3)
    transform = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    big, copies = supercell(crystal, transform)
    assert len(big.numbers) == 3 * round(np.linalg.det(transform))
    fractional = np.linalg.solve(big.cell.T, big.positions.T).T
    distinct = {tuple(np.round(f % 1.0, 6)) for f in fractional}
    assert len(distinct) == len(big.numbers)


@pytest.mark.parametrize("level", ["network", "pipeline"])
def test_prototypes_keep_their_space_group(level):
    """Every crystal system, primitive and conventional cells; random weights strain the cell
    by several percent, so a symmetry-breaking network could not pass."""
    model = tiny_model(3)
    predictor = network_predictor(model) if level == "network" else pipeline_predictor(model)
    crystals = prototypes()
    assert_space_group_kept(predictor, list(crystals.values()), list(crystals))
    strained = [np.abs(cell - c.cell).max() for c, (_, cell) in zip(crystals.values(), predictor(list(crystals.values())))]
    assert min(strained) > 1e-3


def test_primitive_and_conventional_cells_give_the_same_volume_per_atom():
    model = tiny_model(2)
    predictor = pipeline_predictor(model)
    crystals = prototypes()
    for name in ("Cu fcc", "Fe bcc", "Si diamond", "NaCl rocksalt"):
        change = assert_same_volume_per_atom(predictor, crystals[f"{name} primitive"], crystals[f"{name} cubic"])
        assert abs(change) > 1e-4, name  # the random network does strain the cell


def test_the_checks_fail_on_the_axis_lattice_network(axis_lattice_model, rng):
    """The paper's lattice nodes see the basis: each check the kit makes catches it."""
    crystal = random_crystal(rng, n_atoms=4)
    network = network_predictor(axis_lattice_model)
    pipeline = pipeline_predictor(axis_lattice_model)
    with pytest.raises(AssertionError, match="not basis invariant"):
        assert_basis_invariant(network, crystal, [random_unimodular(rng)])
    with pytest.raises(AssertionError, match="not supercell invariant"):
        assert_supercell_invariant(pipeline, crystal, [np.diag([2, 1, 1])])
    with pytest.raises(AssertionError, match="not translation invariant"):
        assert_translation_invariant(pipeline, crystal, [0.5 * crystal.cell.sum(0)])
    crystals = prototypes()
    with pytest.raises(AssertionError, match="space group not kept"):
        assert_space_group_kept(pipeline, list(crystals.values()), list(crystals))


def test_lattice_written_into_columns_is_caught(axis_lattice_model, crystal, rng, monkeypatch):
    """Writing axis c's update into column c (the authors' bug) must be caught."""
    original = AxisLatticeLayer.lattice_step
    monkeypatch.setattr(AxisLatticeLayer, "lattice_step", lambda self, u: original(self, u).transpose(-1, -2))
    with pytest.raises(AssertionError, match="not rotation equivariant"):
        assert_rotation_equivariant(axis_lattice_model, crystal, [random_rotation(rng)], atol=1e-9)


def test_a_strain_that_is_not_a_tensor_is_caught(model, crystal, rng, monkeypatch):
    """A strain step read off fixed Cartesian axes (a diagonal in the lab frame) breaks
    rotation equivariance, and the kit says so."""
    from e3relax_ase.nn.strain import StrainHead

    original = StrainHead.forward

    def lab_frame(self, *args):
        step = original(self, *args)
        return step + torch.diag_embed(step.diagonal(dim1=-2, dim2=-1))

    monkeypatch.setattr(StrainHead, "forward", lab_frame)
    with pytest.raises(AssertionError, match="not rotation equivariant"):
        assert_o3_equivariant(network_predictor(model), crystal, [random_rotation(rng)])


def test_a_wrap_dependent_centre_is_caught(model, rng, monkeypatch):
    """Displacements that depend on where atoms are written (here: on the centroid of the
    positions as given) are caught by the face-grazing check."""
    from e3relax_ase.nn import model as model_module
    from e3relax_ase.nn.scatter import scatter_mean

    original = model_module.InputGeometry.__init__

    def centred_on_written_atoms(self, graph):
        original(self, graph)
        centroid = scatter_mean(graph.positions, graph.batch, graph.n_graphs)  # of the atoms as written
        self.edge_vec = self.edge_vec + 1e-3 * centroid[self.edge_graph]

    monkeypatch.setattr(model_module.InputGeometry, "__init__", centred_on_written_atoms)
    with pytest.raises(AssertionError, match="face-grazing"):
        assert_face_grazing_invariant(network_predictor(model), random_crystal(rng, n_atoms=3), offsets=(1e-9,))


def test_translation_keeps_lattice_and_carries_positions(model, crystal, rng):
    graph = graph_of([crystal], model.config)
    shift = torch.tensor(rng.normal(size=3) * 3.0)
    moved = CrystalGraph(**{**graph.__dict__, "positions": graph.positions + shift})
    with torch.no_grad():
        a, b = model(graph), model(moved)
    carried = shift @ torch.linalg.solve(graph.cell[0], a.cell[:, 0])  # [T, 3]
    assert torch.allclose(b.positions, a.positions + carried[:, None, :], atol=1e-10)
    assert torch.allclose(b.cell, a.cell, atol=1e-10)


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
    forced = CrystalGraph(
        **{
            **graph.__dict__,
            "edge_src": torch.tensor([1, 0]),
            "edge_dst": torch.tensor([0, 1]),
            "edge_shift": torch.zeros(2, 3, dtype=torch.float64),
        }
    )
    with torch.no_grad():
        a, b = model(graph), model(forced)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.cell, b.cell)


@pytest.mark.parametrize("tilt", [0.0, 3.0])
def test_vacuum_axis_never_stretched(model, rng, tilt):
    """A slab's vacuum vector is kept exactly (tilted or not), its in-plane vectors strain."""
    crystal = random_crystal(rng, n_atoms=4)
    cell = crystal.cell.copy()
    cell[2] = [tilt, 0.0, 25.0]
    slab = CrystalArrays(crystal.numbers, crystal.positions, cell, np.array([True, True, False]))
    out = predict(model, [slab], dtype=torch.float64)[0]
    np.testing.assert_array_equal(out.cell[:, 2], np.broadcast_to(cell[2], (model.config.num_layers, 3)))
    assert np.abs(out.cell[-1, :2] - cell[:2]).max() > 1e-4
    # in-plane vectors stay in the plane of the input's periodic vectors
    normal = np.cross(cell[0], cell[1])
    assert np.abs(out.cell[-1, :2] @ normal).max() < 1e-9 * np.linalg.norm(normal) * 10


def test_slab_prediction_is_rotation_equivariant(model, rng):
    crystal = random_crystal(rng, n_atoms=4)
    cell = crystal.cell.copy()
    cell[2] = [1.0, -2.0, 24.0]
    slab = CrystalArrays(crystal.numbers, crystal.positions, cell, np.array([True, True, False]))
    assert_o3_equivariant(network_predictor(model), slab, [random_rotation(rng), random_rotation(rng, proper=False)])


def test_parameter_count_pinned():
    assert tiny_model().count_parameters() == 17418
    assert E3RelaxH2(ModelConfig()).count_parameters() == 27740292
    assert build_model(AXIS_LATTICE_CONFIG).count_parameters() == 18996


def test_float32_matches_float64(model, crystal):
    out64 = predict(model, [crystal], dtype=torch.float64)[0]
    out32 = predict(model.float(), [crystal], dtype=torch.float32)[0]
    np.testing.assert_allclose(out32.positions, out64.positions, atol=1e-4)


def test_prediction_keeps_the_inputs_fractional_centroid(model, crystal):
    """Output convention: the rigid translation is that of DFT codes (fractional centroid kept)."""
    out = predict(model, [crystal], dtype=torch.float64)[0]
    frac_in = np.linalg.solve(crystal.cell.T, crystal.positions.T).T.mean(0)
    for layer in range(model.config.num_layers):
        frac_out = np.linalg.solve(out.cell[layer].T, out.positions[layer].T).T.mean(0)
        np.testing.assert_allclose(frac_out, frac_in, atol=1e-10)


def test_axis_lattice_network_keeps_the_fractional_centroid_too(axis_lattice_model, crystal):
    out = predict(axis_lattice_model, [crystal], dtype=torch.float64)[0]
    frac_in = np.linalg.solve(crystal.cell.T, crystal.positions.T).T.mean(0)
    frac_out = np.linalg.solve(out.cell[-1].T, out.positions[-1].T).T.mean(0)
    np.testing.assert_allclose(frac_out, frac_in, atol=1e-10)


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


def test_strain_step_is_symmetric_and_bounded(model, rng):
    """The strain head's step is a symmetric tensor whose norm never exceeds max_step."""
    from e3relax_ase.nn.strain import StrainHead

    head = StrainHead(16, 4, max_step=0.3, init_scale=50.0).double()  # huge raw output
    s = torch.randn(3, 16, dtype=torch.float64)
    v = torch.randn(7, 16, 3, dtype=torch.float64) * 10
    u = torch.randn(3, 16, 3, dtype=torch.float64)
    edge_tensors = torch.randn(7, 4, 6, dtype=torch.float64)
    step = head(s, v, u, edge_tensors, torch.tensor([0, 0, 1, 1, 1, 2, 2]))
    torch.testing.assert_close(step, step.transpose(-1, -2))
    norms = torch.linalg.matrix_norm(step)
    assert norms.max() <= 0.3 + 1e-12 and norms.min() > 0.2


def test_supercell_helper_on_a_cell_with_atoms_on_its_faces():
    """Found by the fuzz: fractional coordinates a hair below 0 (wrapped by floor to 1.0) lost
    every copy; the translations are now chosen in integers."""
    cell = np.array(
        [
            [0.19133517141301049, 0.1596360980055288, 1.9844160774378747],
            [-0.16893740341524682, -0.7979371141599656, 1.8261315712657122],
            [0.4452802331395162, -0.4799122026585231, 1.8898173963943345],
        ]
    )
    crystal = CrystalArrays(np.array([1]), np.array([[0.21373293941077415, -0.478664918148908, 5.794963726141462]]), cell, np.ones(3, bool))
    for transform in (np.diag([2, 1, 1]), np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]]), np.array([[2, 1, 0], [0, 1, 1], [1, 0, 2]])):
        big, copies = supercell(crystal, transform)
        assert len(big.numbers) == round(np.linalg.det(transform))
        fractional = np.linalg.solve(big.cell.T, big.positions.T).T
        assert len({tuple(np.round(f % 1.0, 6) % 1.0) for f in fractional}) == len(big.numbers)
