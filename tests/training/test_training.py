"""Training loop: exact resume, learning on a tiny real dataset, config strictness, export."""

import numpy as np
import pytest
import torch

from e3relax_ase.io.checkpoint import load_checkpoint
from e3relax_ase.training.data.pairs import load_pairs, save_pairs
from e3relax_ase.training.train.config import TrainConfig
from e3relax_ase.training.train.dataset import prepare_pairs
from e3relax_ase.training.train.export import export_checkpoint
from e3relax_ase.training.train.trainer import STATE_FILE, train
from tests.paths import ROOT, TEST_DATA

FIXTURE = TEST_DATA / "nrel_sample_pairs.npz"
TINY = {"num_channels": 8, "num_layers": 2, "num_rbf": 8, "num_strain_channels": 2, "max_neighbors": 16}


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    pairs = load_pairs(FIXTURE)
    root = tmp_path_factory.mktemp("pairs")
    n = len(pairs)
    save_pairs(root / "train.npz", pairs.subset(range(0, n - 4)))
    save_pairs(root / "val.npz", pairs.subset(range(n - 4, n)))
    return str(root / "train.npz"), str(root / "val.npz")


def _config(pair_files, out_dir, **overrides):
    values = dict(train_data=pair_files[0], val_data=pair_files[1], out_dir=str(out_dir), model=TINY, batch_size=4, max_epochs=4, lr=2e-3, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_resumed_training_is_bit_identical_to_uninterrupted(pair_files, tmp_path):
    whole = train(_config(pair_files, tmp_path / "whole"), device="cpu")
    assert whole["status"] == "finished" and whole["epochs"] == 4
    # A one-minute-per-call budget cannot fit here, so force one epoch per call instead.
    calls = 0
    while True:
        summary = train(_config(pair_files, tmp_path / "pieces", time_budget_minutes=1e-9), device="cpu")
        calls += 1
        if summary["status"] == "finished":
            break
        assert summary["status"] == "paused" and calls < 10
    assert calls == 4
    a = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "pieces" / STATE_FILE, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["history"][-1]["val_coord_mae"] == b["history"][-1]["val_coord_mae"]


def test_resume_refuses_a_different_config(pair_files, tmp_path):
    train(_config(pair_files, tmp_path, max_epochs=1), device="cpu")
    with pytest.raises(ValueError, match="different training config"):
        train(_config(pair_files, tmp_path, max_epochs=1, weight_decay=1e-3), device="cpu")


def test_training_reduces_the_loss_on_real_pairs(pair_files, tmp_path):
    summary = train(_config(pair_files, tmp_path, max_epochs=12, lr=3e-3), device="cpu")
    log = (tmp_path / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    losses = [float(row.split(",")[header.index("train_loss")]) for row in log[1:]]
    assert losses[-1] < 0.8 * losses[0]
    assert summary["best"]["val_coord_mae"] < summary["best"]["val_dummy_coord_mae"] * 1.05


def test_export_writes_a_loadable_checkpoint_with_the_config(pair_files, tmp_path):
    train(_config(pair_files, tmp_path / "run", max_epochs=1), device="cpu")
    sha = export_checkpoint(tmp_path / "run", tmp_path / "model.pt", {"name": "test-model", "licence": "MIT"})
    model, info = load_checkpoint(tmp_path / "model.pt")
    assert info.sha256 == sha and info.name == "model.pt" and info.metadata["name"] == "test-model"
    assert info.metadata["train_config"]["model"] == TINY
    assert model.config.num_channels == 8


def test_unknown_config_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown training config keys: learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="unknown ModelConfig keys: width"):
        TrainConfig(model={"width": 3})
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nmodel:\n  num_channels: 16\n")
    assert TrainConfig.from_yaml(path).model_config.num_channels == 16


def test_prepared_targets_are_strained_nearest_images_in_the_output_frame(pair_files):
    """Targets are the relaxed crystal reached by a pure strain (its rigid rotation removed),
    each atom on the image nearest its input, with the input's fractional centroid."""
    pairs = load_pairs(pair_files[0])
    prepared = prepare_pairs(pairs, 6.0, 50, dtype=torch.float64)
    graph, target, cell_target = prepared.batch(torch.arange(len(prepared)))
    from e3relax_ase.nn.scatter import scatter_mean

    deformation = torch.linalg.solve(graph.cell, cell_target)  # cell_in^-1 cell_target
    torch.testing.assert_close(deformation, deformation.transpose(1, 2), atol=1e-9, rtol=0)
    assert (torch.linalg.eigvalsh(deformation) > 0).all()
    # the same crystal as the relaxed one: its metric (cell shape) is untouched by the rotation
    for k in range(len(pairs)):
        relaxed = pairs.cell_relaxed[k]
        gram_file = np.sort(np.linalg.eigvalsh(relaxed @ relaxed.T))
        gram_target = np.sort(np.linalg.eigvalsh(cell_target[k].numpy() @ cell_target[k].numpy().T))
        np.testing.assert_allclose(gram_target, gram_file, rtol=1e-9)
    centroid_in = scatter_mean(graph.positions, graph.batch, graph.n_graphs)
    wanted = (centroid_in.unsqueeze(-1) * deformation).sum(-2)  # centroid_in @ deformation
    assert (scatter_mean(target, graph.batch, graph.n_graphs) - wanted).abs().max() < 1e-9
    # every target atom sits on the image nearest its input in fractional coordinates
    frac_in = torch.linalg.solve(graph.cell[graph.batch].transpose(1, 2), graph.positions.unsqueeze(-1)).squeeze(-1)
    frac_out = torch.linalg.solve(cell_target[graph.batch].transpose(1, 2), target.unsqueeze(-1)).squeeze(-1)
    assert (frac_out - frac_in).abs().max() < 0.75


def test_a_rotated_relaxed_crystal_gives_the_same_target():
    """Writing the relaxed crystal turned (a standard orientation) changes nothing."""
    from e3relax_ase.geometry.canonical import canonicalize
    from e3relax_ase.testing import random_crystal, random_rotation
    from e3relax_ase.training.train.dataset import align_target

    rng = np.random.default_rng(4)
    crystal = random_crystal(rng, n_atoms=4)
    strain = np.eye(3) + 0.05 * rng.normal(size=(3, 3))
    relaxed_cell = crystal.cell @ strain
    relaxed_positions = crystal.positions @ strain + 0.05 * rng.normal(size=(4, 3))
    form = canonicalize(crystal.positions, crystal.cell, crystal.pbc)
    plain = align_target(form.positions, form.cell, relaxed_positions, relaxed_cell, form.transform, crystal.pbc)
    rotation = random_rotation(rng)
    turned = align_target(form.positions, form.cell, relaxed_positions @ rotation.T, relaxed_cell @ rotation.T, form.transform, crystal.pbc)
    np.testing.assert_allclose(turned[0], plain[0], atol=1e-10)
    np.testing.assert_allclose(turned[1], plain[1], atol=1e-10)


def test_finetune_from_a_checkpoint_starts_from_its_weights(pair_files, tmp_path):
    """The documented fine-tuning path: init_from a checkpoint, then train on user pairs."""
    import yaml

    from e3relax_ase.config import ModelConfig
    from e3relax_ase.io.checkpoint import save_checkpoint
    from e3relax_ase.nn.model import E3RelaxH2

    torch.manual_seed(11)
    base = E3RelaxH2(ModelConfig(**TINY))
    save_checkpoint(tmp_path / "base.pt", base, {"name": "base"})
    documented = yaml.safe_load((ROOT / "examples" / "finetune" / "finetune.yaml").read_text())
    assert documented["init_from"] == "default" and "model" in documented
    config = _config(pair_files, tmp_path / "ft", max_epochs=1, init_from=str(tmp_path / "base.pt"), lr=1e-9, ema_decay=0.0)
    train(config, device="cpu")
    state = torch.load(tmp_path / "ft" / STATE_FILE, weights_only=True)
    for key, value in base.state_dict().items():  # lr ~ 0: still the base weights
        assert torch.allclose(state["model"][key], value, atol=1e-6), key
    with pytest.raises(ValueError, match="model config differs"):
        train(_config(pair_files, tmp_path / "bad", max_epochs=1, init_from=str(tmp_path / "base.pt"), model={**TINY, "num_channels": 12}), device="cpu")


def test_a_portable_state_resumes_on_another_machine(pair_files, tmp_path):
    """The EMA-only state carried between machines continues the run: counters and log go on,
    the raw weights start at the EMA, the rate warms up again, and a lowered rate is allowed."""
    import shutil

    from e3relax_ase.training.train.export import write_portable_state

    first = train(_config(pair_files, tmp_path / "here", max_epochs=2, batch_size=0, batch_atoms=64, warmup_epochs=1), device="cpu")
    assert first["epochs"] == 2
    portable = write_portable_state(tmp_path / "here", tmp_path / "carried.pt")
    state = torch.load(portable, weights_only=True)
    assert "optimizer" not in state and "model" not in state and state["epoch"] == 2
    there = tmp_path / "there"
    there.mkdir()
    shutil.copy(portable, there / STATE_FILE)
    resumed = train(_config(pair_files, there, max_epochs=3, batch_size=0, batch_atoms=64, warmup_epochs=1, lr=1e-3), device="cpu")
    assert resumed["epochs"] == 3 and resumed["steps"] > first["steps"]
    log = torch.load(there / STATE_FILE, weights_only=True)["history"]
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert log[2]["lr"] <= 1e-3  # the new, lower rate (warming up again)
    with pytest.raises(ValueError, match="different training config"):
        train(_config(pair_files, there, max_epochs=4, batch_size=0, batch_atoms=32, warmup_epochs=1, lr=1e-3), device="cpu")


def test_batches_follow_the_atom_budget_and_cover_the_epoch(pair_files):
    from e3relax_ase.training.train.batching import Budget, EpochBatches

    prepared = prepare_pairs(load_pairs(pair_files[0]), 6.0, 50, dtype=torch.float64)
    order = np.random.default_rng(0).permutation(len(prepared))
    batches = EpochBatches(prepared, order, Budget(max_atoms=40))
    seen = []
    for b in range(len(batches)):
        graph, target, cell_target, _ = batches.collate(b)
        assert graph.positions.shape[0] <= 40 or graph.n_graphs == 1
        reference, reference_target, reference_cell = prepared.batch(torch.as_tensor(order[batches.pair_bounds[b] : batches.pair_bounds[b + 1]]))
        for name in ("numbers", "positions", "batch", "edge_src", "edge_dst", "edge_shift", "n_atoms", "cell"):
            assert torch.equal(getattr(graph, name), getattr(reference, name)), name
        assert torch.equal(target, reference_target) and torch.equal(cell_target, reference_cell)
        seen += order[batches.pair_bounds[b] : batches.pair_bounds[b + 1]].tolist()
    assert seen == order.tolist()


def test_a_portable_state_may_name_its_weights_instead_of_holding_them(pair_files, tmp_path):
    import shutil

    from e3relax_ase.training.train.export import export_checkpoint, write_portable_state

    train(_config(pair_files, tmp_path / "here", max_epochs=1, batch_size=0, batch_atoms=64), device="cpu")
    shipped = tmp_path / "shipped.pt"
    export_checkpoint(tmp_path / "here", shipped, which="last")
    portable = write_portable_state(tmp_path / "here", tmp_path / "carried.pt", weights_checkpoint=str(shipped))
    state = torch.load(portable, weights_only=True)
    assert "ema" not in state and state["weights_checkpoint"]["path"] == str(shipped)
    there = tmp_path / "there"
    there.mkdir()
    shutil.copy(portable, there / STATE_FILE)
    resumed = train(_config(pair_files, there, max_epochs=2, batch_size=0, batch_atoms=64), device="cpu")
    assert resumed["epochs"] == 2
    shipped.write_bytes(shipped.read_bytes()[:-10] + b"0123456789")  # the named file changed
    shutil.copy(portable, there / STATE_FILE)
    with pytest.raises(Exception, match="sha256"):
        train(_config(pair_files, there, max_epochs=2, batch_size=0, batch_atoms=64), device="cpu")
