"""Ship a trained checkpoint: stamp its metadata, evaluate it on the test split, write the
registry entry and the model card. The card's figures come from the same code as
``e3relax-ase evaluate CHECKPOINT DATA --match-sample 300``, so that command reproduces them.

    python scripts/ship_checkpoint.py WEIGHTS.pt NAME --train data/nrel_zintl/train.npz \
        --test data/nrel_zintl/test.npz [--log runs/.../log.csv ...] [--default]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e3relax_ase.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from e3relax_ase.training.data.pairs import load_pairs  # noqa: E402
from e3relax_ase.training.train.evaluate import evaluate_checkpoint  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("weights")
parser.add_argument("name")
parser.add_argument("--train", nargs="+", required=True)
parser.add_argument("--val", nargs="*", default=[])
parser.add_argument("--test", required=True)
parser.add_argument("--log", nargs="*", default=[], help="training logs (CSV) to plot as the validation curve")
parser.add_argument("--notes", default="")
parser.add_argument("--default", action="store_true")
args = parser.parse_args()

model, info = load_checkpoint(args.weights)
elements = sorted({int(z) for path in args.train for z in np.unique(load_pairs(path).numbers)})
training_data = [{"file": str(p), "pairs": len(load_pairs(p)), "metadata": load_pairs(p).metadata} for p in args.train]
metadata = dict(info.metadata)
metadata.update(
    {
        "name": args.name,
        "untrained": False,
        "elements": elements,
        "training_data": training_data,
        "licence": "MIT (weights); training data: see training_data",
        "notes": args.notes,
    }
)
checkpoints = ROOT / "checkpoints"
target = checkpoints / f"{args.name}.pt"
save_checkpoint(target, model, metadata)
torch.set_num_threads(1)
summary = evaluate_checkpoint(target, args.test, out_dir=checkpoints / "cards" / args.name, match_sample=300)
metadata["test_metrics"] = {"data": args.test, **{k: summary[k] for k in ("n_pairs", "match_sample", "model", "dummy", "ratio_to_dummy")}}
sha = save_checkpoint(target, model, metadata)  # metrics inside the file too

curve = None
if args.log:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    offset = 0
    for log in args.log:
        rows = [line.split(",") for line in Path(log).read_text().splitlines()]
        header, rows = rows[0], rows[1:]
        epochs = [offset + int(r[header.index("epoch")]) for r in rows]
        ax.plot(epochs, [float(r[header.index("val_coord_mae")]) for r in rows], label=f"val coord MAE ({Path(log).parent.name or Path(log).stem})")
        dummy = float(rows[0][header.index("val_dummy_coord_mae")])
        offset = epochs[-1]
    ax.axhline(dummy, color="k", ls="--", lw=0.8, label="Dummy")
    ax.axhline(0.5 * dummy, color="r", ls=":", lw=0.8, label="0.5 x Dummy")
    ax.set_xlabel("epoch (rounds concatenated)")
    ax.set_ylabel("Å")
    ax.legend(fontsize=7)
    fig.tight_layout()
    curve = checkpoints / "cards" / args.name / "validation_curve.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)

registry_path = checkpoints / "registry.json"
registry = json.loads(registry_path.read_text())
registry["checkpoints"][args.name] = {
    "file": target.name,
    "sha256": sha,
    "config": model.config.to_dict(),
    "parameters": model.count_parameters(),
    "training_data": [d["file"] for d in training_data],
    "elements": elements,
    "metrics": metadata["test_metrics"],
    "licence": metadata["licence"],
    "untrained": False,
    "card": f"cards/{args.name}/MODEL_CARD.md",
}
if args.default:
    registry["default"] = args.name
registry_path.write_text(json.dumps(registry, indent=2) + "\n")

m, d, r = summary["model"], summary["dummy"], summary["ratio_to_dummy"]
from ase.data import chemical_symbols  # noqa: E402

card = f"""# Model card: {args.name}

| | |
|---|---|
| file | `checkpoints/{target.name}` (sha256 `{sha}`) |
| architecture | E3Relax-H2, F = {model.config.num_channels}, T = {model.config.num_layers}, D = {model.config.cutoff} Å, K = {model.config.max_neighbors}, {model.count_parameters():,} parameters |
| training data | {", ".join(f"{t['file']} ({t['pairs']} pairs)" for t in training_data)} |
| elements seen | {" ".join(chemical_symbols[z] for z in elements)} ({len(elements)}); other elements are refused |
| licence | {metadata["licence"]} |
| notes | {args.notes} |

## Test metrics ({summary["n_pairs"]} pairs of `{args.test}`, chemistries unseen in training)
Reproduce with `e3relax-ase evaluate {args.name} {args.test} --match-sample 300`.

| metric | E3Relax-H2 | Dummy (input) | ratio |
|---|---|---|---|
| coordinate MAE, rigid translation removed (Å) | {m["coord_mae"]:.4f} | {d["coord_mae"]:.4f} | {r["coord_mae"]:.3f} |
| coordinate MAE, paper's definition (Å) | {m["coord_mae_paper"]:.4f} | {d["coord_mae_paper"]:.4f} | {r["coord_mae_paper"]:.3f} |
| volume MAE (Å³) | {m["volume_abs"]:.2f} | {d["volume_abs"]:.2f} | {r["volume_abs"]:.3f} |
| cell shape deviation (Å²) | {m["cell_shape"]:.2f} | {d["cell_shape"]:.2f} | {r["cell_shape"]:.3f} |
| match rate (StructureMatcher 0.2/0.3/5, {summary["match_sample"]} random pairs) | {m["match_rate"]:.3f} | {d["match_rate"]:.3f} | |

Plots: `coord_error_hist.png`, `volume_parity.png`{", `validation_curve.png`" if curve else ""} beside this card;
per-structure errors in `per_structure.csv`.

## Intended use and limits
Pre-relaxing hypothetical crystals before DFT or MLIP relaxation, screening. It was trained on
the elements above only; inputs with other elements are refused rather than guessed. Predictions
are not converged relaxations: use `refine=` with a real calculator where accuracy matters.
"""
(checkpoints / "cards" / args.name / "MODEL_CARD.md").write_text(card)
print(json.dumps({"sha256": sha, **summary}, indent=1))
