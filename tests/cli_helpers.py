"""Helpers shared by the CLI tests: a tiny checkpoint, the relax command, a rattled crystal."""

from ase.build import bulk
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.io.checkpoint import save_checkpoint
from e3relax_ase.testing import tiny_model


def save_tiny_checkpoint(directory) -> str:
    """A random-weight tiny model saved as ``tiny.pt`` in ``directory``; its path."""
    path = directory / "tiny.pt"
    save_checkpoint(path, tiny_model(), {"name": "tiny-test"})
    return str(path)


def run_relax(args, checkpoint, json: bool = True):
    """``e3relax-ase relax ARGS --checkpoint CHECKPOINT [--json]`` through click's runner."""
    return CliRunner().invoke(cli, ["relax", *args, "--checkpoint", checkpoint, *(["--json"] if json else [])], catch_exceptions=False)


def nacl(seed=0):
    """Rock-salt NaCl, conventional cell, rattled by 0.05 Å."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms
