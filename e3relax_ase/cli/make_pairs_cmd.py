"""``e3relax-ase make-pairs``: distil training pairs from seed crystals with any ASE calculator."""

from __future__ import annotations

from pathlib import Path

import click

OUTPUT_SUFFIXES = (".extxyz", ".xyz", ".npz")


def _volume_range(ctx, param, value):
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected LOW,HIGH, e.g. 0.9,1.1") from None
    if not 0 < low <= high:
        raise click.BadParameter("need 0 < LOW <= HIGH")
    return (low, high)


@click.command("make-pairs")
@click.argument("seeds", nargs=-1, required=True)
@click.option("-c", "--calculator", default="emt", show_default=True, help="emt, sevennet, chgnet or module:Class.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file: .extxyz (alternating frames) or .npz (e3relax pair format).",
)
@click.option("--n-per-seed", default=1, show_default=True, type=click.IntRange(min=1), help="Perturbed inputs per seed.")
@click.option(
    "--limit",
    default=None,
    type=click.IntRange(min=1),
    help="Use at most this many seeds per source (random, by --seed).",
)
@click.option(
    "--fmax",
    default=0.02,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Force criterion, eV/Å.",
)
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1), help="Most FIRE steps per input.")
@click.option(
    "--strain",
    default=0.04,
    show_default=True,
    type=click.FloatRange(0, 0.5, max_open=True),
    help="Symmetric strain magnitude.",
)
@click.option("--rattle", default=0.1, show_default=True, type=click.FloatRange(min=0), help="Gaussian rattle per component, Å.")
@click.option("--volume-range", default=None, callback=_volume_range, help="Volume factor range LOW,HIGH (default: keep).")
@click.option(
    "--substitute",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Probability of an element substitution.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes (1 = inline).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--seeds-dir", default=None, type=click.Path(file_okay=False), help="Directory holding perov_5/ and carbon_24/.")
def make_pairs(
    seeds,
    calculator,
    output,
    n_per_seed,
    limit,
    fmax,
    steps,
    strain,
    rattle,
    volume_range,
    substitute,
    workers,
    seed,
    seeds_dir,
):
    """Relax perturbed SEEDS with a teacher calculator and write the converged pairs.

    SEEDS are structure files ASE reads (cif, extxyz, traj, POSCAR, ...), csv(.gz) files with a
    'cif' column, directories of those, or the named sources perov_5, carbon_24, aflow, dcdft,
    pyxtal. Each seed is strained, rattled (optionally rescaled and substituted), then relaxed with
    FIRE + FrechetCellFilter to --fmax; only converged, sane pairs are written.
    """
    import numpy as np

    from e3relax_ase.relax.calculators import resolve_calculator
    from e3relax_ase.training.data.pairs import save_pairs, save_pairs_extxyz
    from e3relax_ase.training.data.seeds import load_seed_structures
    from e3relax_ase.training.distill.distill import make_pairs as run_make_pairs

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.ClickException(f"output {output} must end in {', '.join(OUTPUT_SUFFIXES)}")
    inputs = [Path(s) for s in seeds if Path(s).exists()]
    if any(p.resolve() == output.resolve() for p in inputs):
        raise click.ClickException(f"refusing to overwrite input {output}")
    try:
        factory = resolve_calculator(calculator)
    except (ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    rng = np.random.default_rng(seed)
    structures = []
    for source in seeds:
        try:
            structures += load_seed_structures(source, limit=limit, rng=rng if limit else None, data_dir=seeds_dir)
        except (OSError, ValueError, ImportError) as exc:
            raise click.ClickException(f"cannot read seeds {source!r}: {exc}") from None
        except Exception as exc:  # ASE readers raise parser-specific errors on malformed files
            raise click.ClickException(f"cannot read seeds {source!r}: {type(exc).__name__}: {exc}") from None
    if not structures:
        raise click.ClickException("no seed structures found")
    try:
        pairset, report = run_make_pairs(
            structures,
            factory,
            n_per_seed=n_per_seed,
            rng=rng,
            fmax=fmax,
            steps=steps,
            n_workers=workers,
            strain=strain,
            rattle=rattle,
            volume_range=volume_range,
            substitute=substitute,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    pairset.metadata["rng_seed"] = seed
    pairset.metadata["seeds"] = list(seeds)
    if len(pairset) == 0:
        raise click.ClickException(f"no pair converged; nothing written. {report.summary()}")
    try:
        if output.suffix.lower() == ".npz":
            save_pairs(output, pairset, inputs=inputs)
        else:
            save_pairs_extxyz(output, pairset, inputs=inputs)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{report.summary()}\nwrote {len(pairset)} pairs to {output}", err=True)
