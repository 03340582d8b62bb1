import numpy as np
import torch

from e3relax_ase.nn.model import ModelOutput
from e3relax_ase.training.train.loss import pacd_loss, relaxation_loss
from e3relax_ase.training.train.metrics import match_rate, structure_errors


def _batch(rng, sizes=(3, 5)):
    cells = torch.tensor(np.stack([np.diag(rng.uniform(4, 6, 3)) + rng.normal(0, 0.3, (3, 3)) for _ in sizes]))
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    frac = torch.tensor(rng.uniform(0, 1, (sum(sizes), 3)))
    positions = torch.einsum("nx,nxy->ny", frac, cells[batch])
    return positions, cells, batch


def test_pacd_is_zero_for_truth_and_blind_to_lattice_translations(rng):
    positions, cells, batch = _batch(rng)
    assert pacd_loss(positions, positions, cells, batch).item() == 0.0
    shifted = positions.clone()
    shifted[1] += cells[0, 2] - cells[0, 0]
    shifted[4] -= cells[1, 1]
    assert pacd_loss(shifted, positions, cells, batch).item() < 1e-12


def test_pacd_matches_per_atom_loop_and_is_l1(rng):
    positions, cells, batch = _batch(rng)
    pred = positions + torch.tensor(rng.normal(0, 0.3, positions.shape))
    expected = []
    for i in range(len(pred)):
        images = [pred[i] + torch.tensor([a, b, c], dtype=pred.dtype) @ cells[batch[i]] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
        best = min(images, key=lambda x: float((x - positions[i]).norm()))
        expected.append(best - positions[i])
    errors = torch.stack(expected)
    for k in range(int(batch.max()) + 1):  # each crystal's rigid translation is no error
        errors[batch == k] -= errors[batch == k].mean(0)
    assert torch.allclose(pacd_loss(pred, positions, cells, batch), errors.abs().mean())


def test_pacd_ignores_each_crystals_rigid_translation(rng):
    positions, cells, batch = _batch(rng)
    shifted = positions + torch.tensor([[0.3, -0.2, 0.1]], dtype=positions.dtype) * (batch.unsqueeze(-1) + 1)
    assert pacd_loss(shifted, positions, cells, batch).item() < 1e-12


def test_pacd_gradient_flows_through_aligned_coordinate(rng):
    positions, cells, batch = _batch(rng)
    step = torch.zeros_like(positions)
    step[0] = 0.1  # one atom moves: minus the crystal's mean, each atom's error keeps its sign
    pred = (positions + step).requires_grad_()
    pacd_loss(pred, positions, cells, batch).backward()
    n_first = int((batch == 0).sum())
    # d/d pred_0 of mean |e_i - mean_j e_j| over the first crystal's atoms, xyz: all signs known
    expected = torch.zeros_like(pred)
    expected[batch == 0] = -1.0 / pred.numel()
    expected[0] = (n_first - 1) / n_first / pred.numel() + (n_first - 1) / n_first / pred.numel()
    assert torch.allclose(pred.grad[0], expected[0]) and torch.allclose(pred.grad[batch == 1], torch.zeros_like(pred.grad[batch == 1]))


def test_relaxation_loss_sums_layers_with_weights(rng):
    positions, cells, batch = _batch(rng)
    pattern = torch.tensor([1.0, -1.0], dtype=positions.dtype)[torch.arange(len(positions)) % 2].unsqueeze(-1)
    pattern = pattern - torch.stack([pattern[batch == k].mean(0) for k in batch.tolist()])  # mean-free per crystal
    layers = ModelOutput(torch.stack([positions + 0.2 * pattern, positions + 0.1 * pattern]), torch.stack([cells + 0.3, cells]))
    total, parts = relaxation_loss(layers, positions, cells, batch, layer_weights=[0.5, 1.0], lattice_weight=2.0)
    size = pattern.abs().mean().item()
    expected = 0.5 * (0.2 * size + 2.0 * 0.3) + 1.0 * (0.1 * size + 0.0)
    assert abs(total.item() - expected) < 1e-9
    assert abs(parts["pacd"] - 0.1 * size) < 1e-9 and parts["lattice"] == 0.0


def test_structure_errors_against_hand_values(rng):
    positions, cells, batch = _batch(rng, sizes=(4,))
    scaled = cells * 1.1
    errors = structure_errors(positions + 0.05, scaled, positions, cells, batch)
    assert abs(errors["coord_mae_paper"].item() - 0.05) < 1e-9
    assert errors["coord_mae"].item() < 1e-9  # a rigid translation is no error
    volume = torch.linalg.det(cells).abs()
    assert abs(errors["volume_abs"].item() - (1.331 - 1) * volume.item()) < 1e-6
    g = cells[0] @ cells[0].T
    assert abs(errors["cell_shape"].item() - torch.linalg.matrix_norm(1.21 * g - g).item()) < 1e-6
    noise = torch.tensor(np.random.default_rng(1).normal(0, 0.1, positions.shape))
    noise -= noise.mean(0)
    errors = structure_errors(positions + noise + 0.3, cells, positions, cells, batch)
    assert abs(errors["coord_mae"].item() - noise.abs().mean().item()) < 1e-9


def test_match_rate_identity_and_mismatch():
    from ase.build import bulk

    a = bulk("NaCl", "rocksalt", a=5.64)
    numbers = a.numbers
    same = (a.positions, a.cell.array)
    # StructureMatcher rescales volume (as in the paper), so a uniform squash still matches;
    # a 30 % shear does not.
    squashed = (a.positions * 0.8, a.cell.array * 0.8)
    shear = np.eye(3) + np.array([[0, 0.3, 0], [0, 0, 0], [0, 0, 0]])
    sheared = (a.positions @ shear, a.cell.array @ shear)
    assert match_rate([numbers, numbers], [same, squashed], [same, same]) == 1.0
    assert match_rate([numbers], [sheared], [same]) == 0.0
