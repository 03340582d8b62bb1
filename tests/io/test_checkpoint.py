import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from e3relax_ase.io.checkpoint import FORMAT_VERSION, CheckpointError, file_sha256, load_checkpoint, read_registry, save_checkpoint
from e3relax_ase.relax.predict import CrystalArrays, predict
from e3relax_ase.testing import tiny_model
from tests.paths import TEST_DATA

DATA = TEST_DATA


def test_round_trip_keeps_config_weights_metadata(tmp_path):
    model = tiny_model(seed=3)
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, model, {"name": "x", "training_data": "none", "metrics": {"coord_mae": 0.1}})
    loaded, info = load_checkpoint(path)
    assert sha == info.sha256 == file_sha256(path)
    assert info.config == model.config
    assert info.metadata["metrics"]["coord_mae"] == 0.1
    assert {"e3relax_ase", "torch", "e3nn", "python"} <= set(info.versions)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_golden_checkpoint_reproduces_reference_outputs():
    reference = json.loads((DATA / "golden_tiny_reference.json").read_text())
    model, info = load_checkpoint(DATA / "golden_tiny.pt", expected_sha256=reference["sha256"])
    model = model.double()
    crystals = [CrystalArrays(np.array(c["numbers"]), np.array(c["positions"]), np.array(c["cell"]), np.ones(3, dtype=bool)) for c in reference["inputs"]]
    for prediction, positions, cell in zip(predict(model, crystals, dtype=torch.float64), reference["positions"], reference["cell"]):
        np.testing.assert_allclose(prediction.positions[-1], positions, atol=1e-10)
        np.testing.assert_allclose(prediction.cell[-1], cell, atol=1e-10)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/e3relax_pwned",))


def test_malicious_pickle_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "e3relax-ase-checkpoint", "payload": _Payload()}, handle)
    Path("/tmp/e3relax_pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_checkpoint(path)
    assert not Path("/tmp/e3relax_pwned").exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    data = (DATA / "golden_tiny.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_checkpoint(path)


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(tiny_model().state_dict(), path)  # a bare state dict, as upstream ships
    with pytest.raises(CheckpointError, match="not an e3relax-ase checkpoint"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    payload = torch.load(DATA / "golden_tiny.pt", weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="newer than this e3relax-ase reads"):
        load_checkpoint(path)


def test_weights_not_fitting_config_are_refused(tmp_path):
    path = tmp_path / "mismatch.pt"
    payload = torch.load(DATA / "golden_tiny.pt", weights_only=True)
    payload["config"]["num_channels"] = 32
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not fit its own config"):
        load_checkpoint(path)


def test_sha256_mismatch_names_both_hashes():
    with pytest.raises(CheckpointError, match="expected 0+, found [0-9a-f]{64}"):
        load_checkpoint(DATA / "golden_tiny.pt", expected_sha256="0" * 64)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="neither a registered name"):
        load_checkpoint("no-such-model")


def _shipped_path() -> Path:
    from e3relax_ase.io.checkpoint import CHECKPOINT_DIR, read_registry

    registry = read_registry()
    return CHECKPOINT_DIR / registry["checkpoints"][registry["default"]]["file"]


def test_modified_copy_of_a_shipped_checkpoint_is_labelled_by_its_file_name(tmp_path, caplog):
    data = bytearray(_shipped_path().read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the weights
    path = tmp_path / "copy.pt"
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="e3relax_ase.io.checkpoint"):
        _, info = load_checkpoint(path)
    default = read_registry()["default"]
    assert info.name == "copy.pt" and info.metadata["name"] == default
    assert f"calls itself '{default}'" in caplog.text and "labelled 'copy.pt'" in caplog.text


def test_unregistered_checkpoint_warns_and_a_registered_file_keeps_its_name(tmp_path, caplog):
    path = tmp_path / "mine.pt"
    save_checkpoint(path, tiny_model(), {"name": "my-model"})
    with caplog.at_level("WARNING", logger="e3relax_ase.io.checkpoint"):
        _, info = load_checkpoint(path)
    assert info.name == "mine.pt" and "is not registered" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="e3relax_ase.io.checkpoint"):
        _, info = load_checkpoint(_shipped_path())  # the shipped file given by its path
    assert info.name == read_registry()["default"] and caplog.text == ""


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"", b"   \n"])
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_message(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a checkpoint file \\(not written by torch.save"):
        load_checkpoint(path)


def test_the_paper_design_checkpoint_loads_with_a_warning(caplog):
    """The former default (format 1) still loads, as the axis-lattice network, and says what it is."""
    with caplog.at_level("WARNING", logger="e3relax_ase.io.checkpoint"):
        model, info = load_checkpoint("e3relax-h2-zintl-axis-f128")
    assert info.config.architecture == "axis-lattice" and type(model).__name__ == "AxisLatticeE3RelaxH2"
    assert "depends on the lattice basis" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="e3relax_ase.io.checkpoint"):
        load_checkpoint("default")
    assert caplog.text == ""
