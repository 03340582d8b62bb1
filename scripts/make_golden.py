"""Regenerate tests/data/golden_tiny.pt and its reference outputs (run only on purpose:
changing them hides architecture drift that the golden test exists to catch)."""

import json
from pathlib import Path

import numpy as np
import torch

from e3relax_ase.io.checkpoint import save_checkpoint
from e3relax_ase.relax.predict import predict
from e3relax_ase.testing import random_crystal, tiny_model

root = Path(__file__).resolve().parents[1] / "tests" / "data"
model = tiny_model(seed=7)
sha = save_checkpoint(root / "golden_tiny.pt", model, {"name": "golden-tiny", "untrained": True, "purpose": "tests"})
rng = np.random.default_rng(2024)
crystals = [random_crystal(rng, n_atoms=n) for n in (2, 5)]
predictions = predict(model, crystals, dtype=torch.float64)
reference = {
    "sha256": sha,
    "inputs": [{"numbers": c.numbers.tolist(), "positions": c.positions.tolist(), "cell": c.cell.tolist()} for c in crystals],
    "positions": [p.positions[-1].tolist() for p in predictions],
    "cell": [p.cell[-1].tolist() for p in predictions],
}
(root / "golden_tiny_reference.json").write_text(json.dumps(reference, indent=1))
print(sha)
