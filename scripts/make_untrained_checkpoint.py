"""Write the untrained placeholder checkpoint and its registry entry.

It exists so that the relaxer and the CLI work end to end before a trained checkpoint ships;
everything that loads it says on stderr that its predictions are meaningless.
"""

import json
from pathlib import Path

import torch

from e3relax_ase.config import ModelConfig
from e3relax_ase.io.checkpoint import save_checkpoint
from e3relax_ase.nn.model import E3RelaxH2

root = Path(__file__).resolve().parents[1] / "checkpoints"
name = "e3relax-h2-untrained"
torch.manual_seed(0)
config = ModelConfig(num_channels=32, num_layers=2, num_rbf=32, num_strain_channels=4, output_init_scale=1e-4)
model = E3RelaxH2(config)
sha = save_checkpoint(root / f"{name}.pt", model, {"name": name, "untrained": True, "licence": "MIT", "training_data": "none: random weights"})
registry_path = root / "registry.json"
registry = json.loads(registry_path.read_text()) if registry_path.exists() else {"default": name, "checkpoints": {}}
registry["checkpoints"][name] = {
    "file": f"{name}.pt",
    "sha256": sha,
    "config": config.to_dict(),
    "training_data": "none (random weights, a placeholder until a trained checkpoint ships)",
    "metrics": {},
    "licence": "MIT",
    "untrained": True,
}
registry.setdefault("default", name)
registry_path.write_text(json.dumps(registry, indent=2) + "\n")
print(name, sha)
