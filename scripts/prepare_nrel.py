"""Prepare the real NREL Zintl DFT pairs: our format, chemical-system split 80/10/10, data card, plots.

Usage (from the repository root)::

    python scripts/prepare_nrel.py [--input ../shared/data/nrel_zintl_dft_pairs.npz] [--out data/nrel_zintl]

Writes ``{train,val,test}.npz``, ``DATACARD.md``, ``displacement_hist.png`` and
``volume_change_hist.png`` into ``--out``. Positions are stored exactly as given (not unwrapped).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e3relax_ase.training.data.datacard import plot_statistics, write_data_card  # noqa: E402
from e3relax_ase.training.data.pairs import load_pairs, save_pairs  # noqa: E402
from e3relax_ase.training.data.splits import split_by_chemical_system  # noqa: E402

logger = logging.getLogger("prepare_nrel")

SOURCE = (
    "NREL hypothetical Zintl-type compounds (pnictides and tetrelides of alkali, alkaline-earth and main-group "
    "metals), ICSD prototypes decorated with new elements; files from the public repository "
    "prashungorai/combined-gnn"
)
CITATION = (
    'P. Pandey, J. Qu, V. Stevanovic, P. St. John, P. Gorai, "Predicting energy and stability of known and '
    'hypothetical crystals using graph neural network", Patterns 2, 100361 (2021)'
)
TEACHER = "VASP (PBE), positions and cell relaxed at NREL"
LICENCE = "MIT (as stated in the README of prashungorai/combined-gnn)"
FRACTIONS = (0.8, 0.1, 0.1)
SEED = 0
MATCH_SAMPLE = 300


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=REPO.parent / "shared" / "data" / "nrel_zintl_dft_pairs.npz")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "nrel_zintl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    pairs = load_pairs(args.input)
    pairs.metadata = {
        "name": "nrel_zintl",
        "source": SOURCE,
        "teacher": TEACHER,
        "licence": LICENCE,
        "citation": CITATION,
    }
    splits = split_by_chemical_system(pairs, FRACTIONS, seed=SEED)
    rule = (
        f"split_by_chemical_system(fractions={FRACTIONS}, seed={SEED}): every chemical system (sorted set of "
        "elements) lies wholly in one split, so val/test chemistries are unseen in training. Systems are shuffled "
        "with numpy.random.default_rng(seed) and each goes to the split furthest below its target pair count."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, indices in splits.items():
        part = pairs.subset(indices)
        part.metadata["split"] = {"method": "chemsys", "fractions": list(FRACTIONS), "seed": SEED, "name": name}
        save_pairs(args.out / f"{name}.npz", part, inputs=[args.input])
    figures = plot_statistics(pairs, args.out)
    how = (
        f"`python scripts/prepare_nrel.py` converted `nrel_zintl_dft_pairs.npz` ({len(pairs)} pairs) to the "
        "e3relax-pairs format unchanged: relaxed positions are stored exactly as given (not unwrapped or aligned "
        "to the unrelaxed ones; the loss handles periodic images). The unrelaxed inputs were not rescaled in "
        "volume, so structures swell and atoms move far on relaxing: a hard set."
    )
    metrics = write_data_card(
        args.out / "DATACARD.md",
        pairs,
        splits,
        title="NREL Zintl DFT relaxation pairs (nrel_zintl)",
        source=SOURCE,
        teacher=TEACHER,
        licence=LICENCE,
        citation=CITATION,
        how_made=how,
        split_rule=rule,
        match_sample=MATCH_SAMPLE,
        seed=SEED,
        figures={"per-atom displacement (all pairs)": figures[0].name, "volume change (all pairs)": figures[1].name},
    )
    for name, m in metrics.items():
        logger.info(
            "%s: %d pairs, coord MAE %.3f Å (median %.3f), volume MAE %.1f Å^3, match %d/%d",
            name,
            m["n_pairs"],
            m["coord_mae_mean"],
            m["coord_mae_median"],
            m["volume_mae"],
            m["match_n_matched"],
            m["match_n_tested"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
