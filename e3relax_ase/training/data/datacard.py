"""Describe a pair dataset: the identity ("Dummy") baseline, a Markdown data card, histograms.

The Dummy model predicts the relaxed structure to be the unrelaxed input. Its metrics, per split:

* coordinate MAE (Å): for each atom the image k in {-1, 0, 1}^3 of the RELAXED cell minimising
  ``|r_unrelaxed + k @ L_relaxed - r_relaxed|`` is chosen (only along periodic directions); the
  absolute components of that difference are averaged over atoms and x, y, z per structure, then
  over structures (mean and median reported);
* volume MAE (Å^3): mean of ``|det L_unrelaxed - det L_relaxed|``;
* match rate: fraction of pairs whose unrelaxed and relaxed structures pymatgen's
  ``StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5)`` calls the same, optionally on a random
  subsample of ``match_sample`` pairs.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e3relax_ase.training.data.pairs import PairSet
from e3relax_ase.training.data.splits import chemical_systems

if TYPE_CHECKING:
    from e3relax_ase.training.train.metrics import MatcherSettings

logger = logging.getLogger(__name__)

MATCHER_SETTINGS: MatcherSettings = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5}
_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64)  # [27, 3]


def aligned_displacements(pairset: PairSet, chunk: int = 65536) -> np.ndarray:
    """Per-atom displacement from unrelaxed to relaxed, taking the nearest relaxed-cell image.

    Args:
        pairset: the pairs.
        chunk: atoms processed at once (bounds memory to ~chunk * 27 * 3 floats).

    Returns:
        [N, 3] Å, ``r_unrelaxed + k @ L_relaxed - r_relaxed`` with the minimising k in {-1,0,1}^3.
    """
    owner = pairset.pair_index()  # [N]
    out = np.empty_like(pairset.pos_unrelaxed)
    for start in range(0, len(owner), chunk):
        sl = slice(start, start + chunk)
        cells = pairset.cell_relaxed[owner[sl]]  # [m, 3, 3]
        shifts = np.einsum("kc,mcd->mkd", _IMAGES, cells)  # [m, 27, 3]
        diff = (pairset.pos_unrelaxed[sl] - pairset.pos_relaxed[sl])[:, None, :] + shifts  # [m, 27, 3]
        dist = np.linalg.norm(diff, axis=2)  # [m, 27]
        # Images along non-periodic directions are not allowed.
        nonperiodic = ~pairset.pbc[owner[sl]]  # [m, 3]
        forbidden = (nonperiodic[:, None, :] & (_IMAGES[None, :, :] != 0)).any(axis=2)  # [m, 27]
        dist[forbidden] = np.inf
        best = np.argmin(dist, axis=1)  # [m]
        out[sl] = diff[np.arange(len(best)), best]
    return out


def per_structure_coordinate_mae(pairset: PairSet) -> np.ndarray:
    """Dummy coordinate MAE of each pair (mean |component| of the aligned displacement).

    Returns:
        [n] Å.
    """
    abs_disp = np.abs(aligned_displacements(pairset)).mean(axis=1)  # [N]
    sums = np.bincount(pairset.pair_index(), weights=abs_disp, minlength=len(pairset))
    return sums / pairset.n_atoms


def match_rate(pairset: PairSet, indices: np.ndarray | None = None) -> tuple:
    """Count pairs whose two structures StructureMatcher (``MATCHER_SETTINGS``) calls the same.

    Args:
        pairset: the pairs.
        indices: pairs to test; all by default.

    Returns:
        ``(n_matched, n_tested)``.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Lattice, Structure

    matcher = StructureMatcher(**MATCHER_SETTINGS)
    indices = np.arange(len(pairset)) if indices is None else np.asarray(indices)
    matched = 0
    for k in indices:
        p = pairset.pair(int(k))
        # pymatgen takes atomic numbers for species (documented), but its annotation lists species objects only.
        unrelaxed = Structure(Lattice(p.cell_unrelaxed), p.numbers, p.pos_unrelaxed, coords_are_cartesian=True)  # type: ignore[arg-type]
        relaxed = Structure(Lattice(p.cell_relaxed), p.numbers, p.pos_relaxed, coords_are_cartesian=True)  # type: ignore[arg-type]
        matched += bool(matcher.fit(unrelaxed, relaxed))
    return matched, len(indices)


def dummy_metrics(pairset: PairSet, match_sample: int | None = None, seed: int = 0) -> dict:
    """Metrics of the identity baseline (definitions in the module docstring).

    Args:
        pairset: the pairs.
        match_sample: test StructureMatcher on this many random pairs (all if None or larger;
            0 skips matching).
        seed: random seed of the subsample.

    Returns:
        dict with ``n_pairs``, ``coord_mae_mean``, ``coord_mae_median`` (Å), ``volume_mae`` (Å^3),
        ``volume_ratio_median`` (V_relaxed / V_unrelaxed), ``match_rate``, ``match_n_matched``,
        ``match_n_tested``.
    """
    n = len(pairset)
    if n == 0:
        return {"n_pairs": 0}
    mae = per_structure_coordinate_mae(pairset)
    vol_u = np.linalg.det(pairset.cell_unrelaxed)
    vol_r = np.linalg.det(pairset.cell_relaxed)
    if match_sample is None or match_sample >= n:
        sample = np.arange(n)
    else:
        sample = np.sort(np.random.default_rng(seed).choice(n, size=match_sample, replace=False))
    matched, tested = match_rate(pairset, sample) if len(sample) else (0, 0)
    return {
        "n_pairs": n,
        "coord_mae_mean": float(mae.mean()),
        "coord_mae_median": float(np.median(mae)),
        "volume_mae": float(np.abs(vol_u - vol_r).mean()),
        "volume_ratio_median": float(np.median(vol_r / vol_u)),
        "match_rate": matched / tested if tested else float("nan"),
        "match_n_matched": int(matched),
        "match_n_tested": int(tested),
    }


def element_symbols(pairset: PairSet) -> list:
    """Sorted element symbols present in the pair set."""
    from ase.data import chemical_symbols

    return sorted(chemical_symbols[z] for z in np.unique(pairset.numbers))


def _resolve_splits(pairset: PairSet | None, splits: Mapping | None) -> dict:
    if not splits:
        if pairset is None:
            raise ValueError("write_data_card needs a pair set or splits")
        return {"all": pairset}
    out = {}
    for name, value in splits.items():
        if isinstance(value, PairSet):
            out[name] = value
        elif pairset is None:
            raise ValueError(f"split {name!r} is given as indices but no pair set was passed")
        else:
            out[name] = pairset.subset(value)
    return out


def write_data_card(
    path: str | os.PathLike,
    pairset: PairSet | None,
    splits: Mapping | None = None,
    source: str = "unknown",
    teacher: str = "unknown",
    licence: str = "unknown",
    citation: str | None = None,
    how_made: str | None = None,
    split_rule: str | None = None,
    title: str = "Pair dataset",
    match_sample: int | None = 300,
    seed: int = 0,
    figures: Mapping | None = None,
) -> dict:
    """Write a Markdown data card: provenance, counts, elements and Dummy metrics per split.

    Args:
        path: destination ``.md`` file.
        pairset: the whole set (needed when ``splits`` holds indices).
        splits: name -> indices into ``pairset`` or name -> PairSet; default one split ``all``.
        source, teacher, licence, citation: provenance lines.
        how_made: free text on how the pairs were made.
        split_rule: free text on how the splits were made.
        title: card title.
        match_sample: StructureMatcher subsample per split (None = all pairs).
        seed: seed of that subsample.
        figures: caption -> relative path of images to link.

    Returns:
        dict split name -> Dummy metrics.

    Raises:
        ValueError: if neither a pair set nor PairSet splits are given.
    """
    parts = _resolve_splits(pairset, splits)
    everything = PairSet.concatenate(list(parts.values())) if pairset is None else pairset
    metrics = {name: dummy_metrics(ps, match_sample=match_sample, seed=seed) for name, ps in parts.items()}
    lines = [f"# {title}", ""]
    lines += [f"- **Source:** {source}", f"- **Teacher (relaxed structures):** {teacher}", f"- **Licence:** {licence}"]
    if citation:
        lines.append(f"- **Citation:** {citation}")
    lines += ["- **Format:** e3relax-pairs npz, version 1 (see `docs/data.md`)", ""]
    lines += [
        "## Counts",
        "",
        "| split | pairs | atoms | elements | chemical systems | atoms/pair median | atoms/pair max |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for name, ps in list(parts.items()) + ([("total", everything)] if len(parts) > 1 else []):
        n_at = ps.n_atoms if len(ps) else np.zeros(1)
        lines.append(
            f"| {name} | {len(ps)} | {int(ps.n_atoms.sum())} | {len(element_symbols(ps))} | "
            f"{len(set(chemical_systems(ps)))} | {np.median(n_at):g} | {int(n_at.max())} |"
        )
    elements = element_symbols(everything)
    lines += ["", f"## Elements ({len(elements)})", "", " ".join(elements), ""]
    lines += ["## Dummy baseline (prediction = unrelaxed input)", ""]
    lines += ["| split | coord MAE mean (Å) | coord MAE median (Å) | volume MAE (Å^3) | median V_r/V_u | match rate |"]
    lines.append("|---|---|---|---|---|---|")
    for name, m in metrics.items():
        if not m.get("n_pairs"):
            lines.append(f"| {name} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {m['coord_mae_mean']:.3f} | {m['coord_mae_median']:.3f} | {m['volume_mae']:.1f} | "
            f"{m['volume_ratio_median']:.3f} | {m['match_rate']:.3f} ({m['match_n_matched']}/{m['match_n_tested']}) |"
        )
    sample_note = "all pairs of each split" if match_sample is None else f"a random subsample of at most {match_sample} pairs per split (numpy seed {seed})"
    lines += [
        "",
        "Coordinate MAE: per atom, the image of the relaxed cell (k in {-1,0,1}^3) nearest to the unrelaxed "
        "position is used; |dx|, |dy|, |dz| are averaged per structure, then over structures. Volume MAE: "
        f"mean |det L_u - det L_r|. Match rate: pymatgen StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5) "
        f"of unrelaxed vs relaxed, on {sample_note}.",
        "",
    ]
    if how_made or split_rule:
        lines += ["## How it was made", ""]
        if how_made:
            lines += [how_made, ""]
        if split_rule:
            lines += [f"Splits: {split_rule}", ""]
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures.items():
            lines += [f"![{caption}]({rel})", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    logger.info("wrote data card %s", path)
    return metrics


def plot_statistics(pairset: PairSet, out_dir: str | os.PathLike, prefix: str = "") -> list:
    """Save histograms of per-atom displacement and of the volume change (PNG).

    Args:
        pairset: the pairs.
        out_dir: directory for ``{prefix}displacement_hist.png`` and ``{prefix}volume_change_hist.png``.
        prefix: file name prefix.

    Returns:
        The two paths.
    """
    # A bare Figure renders PNG through Agg without pyplot, so the caller's backend is untouched.
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    displacement = np.linalg.norm(aligned_displacements(pairset), axis=1)  # [N] Å
    volume_change = 100.0 * (np.linalg.det(pairset.cell_relaxed) / np.linalg.det(pairset.cell_unrelaxed) - 1.0)  # [n] %
    paths = []
    for values, xlabel, name, unit in (
        (displacement, "|r_relaxed - r_unrelaxed| per atom, nearest image (Å)", "displacement_hist.png", "atoms"),
        (volume_change, "volume change V_relaxed / V_unrelaxed - 1 (%)", "volume_change_hist.png", "pairs"),
    ):
        fig = Figure(figsize=(5, 3.5), dpi=120)
        ax = fig.subplots()
        ax.hist(values, bins=60, color="#3b6ea5")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")  # long tails (large cells that swell) would hide in a linear scale
        ax.set_ylabel(f"{unit}")
        ax.set_title(f"{len(pairset)} pairs; median {np.median(values):.3g}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{prefix}{name}"
        fig.savefig(path)
        paths.append(path)
    return paths
