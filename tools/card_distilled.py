"""Write the data card and plots of the SevenNet-0 distilled pairs (split 90/5/5 by chemical system, seed 0)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e3relax_ase.training.data.datacard import plot_statistics, write_data_card  # noqa: E402
from e3relax_ase.training.data.pairs import load_pairs, save_pairs  # noqa: E402
from e3relax_ase.training.data.splits import split_by_chemical_system  # noqa: E402

folder = ROOT / "data" / "sevennet0_distilled"
pairs = load_pairs(folder / "pairs.npz")
splits = split_by_chemical_system(pairs, (0.9, 0.05, 0.05), seed=0)
for name, indices in splits.items():
    save_pairs(folder / f"{name}.npz", pairs.subset(indices))
runlog = json.loads((folder / "RUNLOG.json").read_text())["relax_log"]
paths = plot_statistics(pairs, folder)
figures = {("Displacement histogram" if "disp" in p.name else "Volume-change histogram"): p.name for p in map(Path, paths)}
write_data_card(
    folder / "DATACARD.md",
    pairs,
    splits,
    title="SevenNet-0 distilled pairs",
    source="seeds: perov_5 and carbon_24 (cdvae, MIT), pymatgen AFLOW prototypes with MP-like element substitution, ASE dcdft elements; perturbed (symmetric strain, rattle, volume rescale) as users make inputs",  # noqa: E501
    teacher=pairs.metadata.get("teacher", "SevenNet-0"),
    licence="MIT (our relaxations); SevenNet-0 weights MIT; seed structures MIT",
    how_made=(
        f"scripts/distill_gpu.py relax on one {runlog['device']['gpu']}: batched FIRE + Frechet cell filter "
        f"(e3relax_ase/training/distill/batched_relax.py) over SevenNet-0 to fmax {runlog['fmax']} eV/Å, max {runlog['max_steps']} steps; "
        f"{runlog['finished']} structures finished, {runlog['converged']} converged ({runlog['converged_fraction_of_finished']:.1%}), "
        f"{len(pairs)} kept after sanity checks (volume ratio in [0.5, 2], min distance > 0.5 Å); "
        f"{runlog['converged_pairs_per_hour_loop']:,} converged pairs per GPU-hour measured"
    ),
    split_rule="chemical system (sorted element set) wholly in one split, 90/5/5, seed 0 (e3relax_ase.training.data.splits.split_by_chemical_system)",
    figures=figures,
)
print((folder / "DATACARD.md").read_text()[:3000])
