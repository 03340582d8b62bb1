"""Shared by the examples: where to write outputs (argv[1], or a fresh temporary folder)."""

import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def output_dir() -> Path:
    """The folder given as the first argument (created), else a new temporary folder."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="e3relax-example-"))
    path.mkdir(parents=True, exist_ok=True)
    return path
