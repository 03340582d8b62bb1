"""Training under torchrun: 2 CPU processes (gloo) give the weights of 1 process with twice the batch."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from e3relax_ase.training.data.pairs import load_pairs, save_pairs
from e3relax_ase.training.train.config import TrainConfig
from e3relax_ase.training.train.trainer import LOG_FILE, STATE_FILE, SUMMARY_FILE, train
from tests.paths import TEST_DATA

FIXTURE = TEST_DATA / "nrel_sample_pairs.npz"
TINY = {"num_channels": 8, "num_layers": 2, "num_rbf": 8, "num_strain_channels": 2, "max_neighbors": 16}
WORLD_SIZE = 2
BATCH_PER_RANK = 2
EPOCHS = 3
LAUNCH_TIMEOUT = 120  # seconds; a desynchronised rank shows up as a hang, not as a wrong answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(n_procs: int, argv: list[str], cwd: Path, per_rank_dirs: bool = False, setup: str = "") -> subprocess.CompletedProcess:
    """``python -m e3relax_ase ARGV`` in ``n_procs`` processes under torchrun (gloo on CPU).

    With ``per_rank_dirs`` each process runs in ``cwd/rank<RANK>``, so a relative out_dir in
    the config shows which rank wrote what; ``setup`` is Python run first in each process.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cd = "os.chdir('rank' + os.environ['RANK'])" if per_rank_dirs else ""
    code = "; ".join(filter(None, ["import os, sys", cd, setup, f"from e3relax_ase.cli.main import main; sys.exit(main({argv!r}))"]))
    if per_rank_dirs:
        for rank in range(n_procs):
            (cwd / f"rank{rank}").mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n_procs}", f"--master-port={free_port()}"]
    argv_all = launcher + ["--no-python", sys.executable, "-c", code]
    with subprocess.Popen(argv_all, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun then stops its workers (which a kill would orphan).
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
            raise
    return subprocess.CompletedProcess(argv_all, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def equal_size_pairs(tmp_path_factory):
    """Train on the fixture's 6-atom structures only; validate on the others."""
    pairs = load_pairs(FIXTURE)
    six = np.flatnonzero(pairs.n_atoms == 6)
    rest = np.flatnonzero(pairs.n_atoms != 6)[:4]
    # 10 structures: 5 per rank, so batches of 2, 2 and a partial 1 per rank (4, 4, 2 in one process).
    assert len(six) == 10
    root = tmp_path_factory.mktemp("pairs")
    save_pairs(root / "train.npz", pairs.subset(six))
    save_pairs(root / "val.npz", pairs.subset(rest))
    return str(root / "train.npz"), str(root / "val.npz")


def _config(pair_files, out_dir, batch_size) -> dict:
    return {
        "train_data": pair_files[0],
        "val_data": pair_files[1],
        "out_dir": str(out_dir),
        "model": TINY,
        "batch_size": batch_size,
        "max_epochs": EPOCHS,
        "lr": 2e-3,
        "seed": 3,
    }


def test_two_ranks_equal_one_process_with_twice_the_batch(equal_size_pairs, tmp_path):
    config_path = tmp_path / "ddp.yaml"
    # A relative out_dir: each rank resolves it in its own working directory.
    config_path.write_text(yaml.safe_dump(_config(equal_size_pairs, "run", BATCH_PER_RANK)))
    result = torchrun(WORLD_SIZE, ["train", str(config_path), "--device", "cpu"], tmp_path, per_rank_dirs=True)
    assert result.returncode == 0, result.stderr[-4000:]

    ddp_dir, other_dir = tmp_path / "rank0" / "run", tmp_path / "rank1" / "run"
    for name in (LOG_FILE, STATE_FILE, SUMMARY_FILE, "best_ema.pt"):
        assert (ddp_dir / name).exists(), name
        assert not (other_dir / name).exists(), f"rank 1 wrote {name}"

    single = train(TrainConfig(**_config(equal_size_pairs, tmp_path / "single", WORLD_SIZE * BATCH_PER_RANK)), device="cpu")
    assert single["status"] == "finished" and single["epochs"] == EPOCHS

    # Why equal atom counts: the loss of a batch is a mean over its atoms (PACD) and over its
    # crystals (lattice term). DDP averages the gradients of the ranks, i.e. it differentiates
    # the mean of the per-rank means, (L_0 + L_1) / 2. One process differentiates the mean over
    # the union, (n_0 L_0 + n_1 L_1) / (n_0 + n_1). The two agree only when every rank holds
    # the same number of atoms (n_0 = n_1) in every step, which the same atom count per
    # structure (and the same number of structures per rank) guarantees. With mixed sizes DDP
    # is still correct training, just a differently weighted average, so the weights differ.
    ddp = torch.load(ddp_dir / STATE_FILE, weights_only=True)
    one = torch.load(tmp_path / "single" / STATE_FILE, weights_only=True)
    assert ddp["step"] == one["step"] == EPOCHS * 3
    for key in one["model"]:
        torch.testing.assert_close(ddp["model"][key], one["model"][key], rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(ddp["ema"][key], one["ema"][key], rtol=0, atol=1e-5, msg=key)
    # The logged train loss covers both ranks' shards, so it is the single run's loss too.
    for row_ddp, row_one in zip(ddp["history"], one["history"]):
        assert row_ddp["lr"] == row_one["lr"]
        assert abs(row_ddp["train_loss"] - row_one["train_loss"]) < 1e-5
        assert abs(row_ddp["val_coord_mae"] - row_one["val_coord_mae"]) < 1e-5


def test_a_dataset_not_divisible_by_the_ranks_does_not_hang(equal_size_pairs, tmp_path):
    """9 pairs on 2 ranks: each epoch drops one, so both ranks take the same number of steps."""
    pairs = load_pairs(equal_size_pairs[0])
    save_pairs(tmp_path / "odd.npz", pairs.subset(range(9)))
    values = _config((str(tmp_path / "odd.npz"), equal_size_pairs[1]), tmp_path / "run", 4)
    config_path = tmp_path / "odd.yaml"
    config_path.write_text(yaml.safe_dump({**values, "max_epochs": 2}))
    result = torchrun(WORLD_SIZE, ["train", str(config_path), "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * 1  # 4 structures per rank: one step per epoch
