"""``e3relax-ase data``: import, split, describe and plot pair datasets; generate inputs."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _fractions(ctx, param, value):
    try:
        fractions = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected comma-separated numbers, e.g. 0.8,0.1,0.1") from None
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise click.BadParameter("need three non-negative fractions summing to 1")
    return fractions


def _load(path: Path):
    from e3relax_ase.training.data.pairs import load_pairs

    try:
        return load_pairs(path)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None


@click.group("data")
def data():
    """Import, split, describe and plot pair datasets (e3relax-pairs npz format); generate inputs."""


@data.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output .npz (pair format) or .extxyz.",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "npz", "extxyz", "authors", "vasp", "traj", "db"]),
)
@click.option("--keep-splits", is_flag=True, help="Authors' layout: also write OUTPUT_<split>.npz per CSV split.")
@click.option("--source-name", default=None, help="Metadata: where the data comes from.")
@click.option("--teacher", default=None, help="Metadata: what relaxed the structures.")
@click.option("--licence", default=None, help="Metadata: licence of the data.")
@click.option("--citation", default=None, help="Metadata: how to cite the data.")
def import_cmd(source, output, fmt, keep_splits, source_name, teacher, licence, citation):
    """Convert SOURCE (extxyz, CIF layout, VASP runs, .traj, ASE db, npz) into a pair file."""
    from e3relax_ase.training.data.importers import detect_format, import_authors_layout, import_pairs
    from e3relax_ase.training.data.pairs import PairSet, save_pairs, save_pairs_extxyz

    if output.suffix.lower() not in (".npz", ".extxyz", ".xyz"):
        raise click.ClickException(f"output {output} must end in .npz or .extxyz")
    try:
        resolved = detect_format(source) if fmt == "auto" else fmt
        if resolved == "authors":
            parts = import_authors_layout(source)
            pairset = PairSet.concatenate(list(parts.values()))
        else:
            parts = {}
            pairset = import_pairs(source, format=resolved)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    extra = {"source": source_name, "teacher": teacher, "licence": licence, "citation": citation}
    extra = {k: v for k, v in extra.items() if v is not None}
    written = []
    try:
        targets = [(output, pairset)]
        if keep_splits and parts:
            targets += [(output.with_name(f"{output.stem}_{name}.npz"), part) for name, part in parts.items()]
        for path, part in targets:
            part.metadata.update(extra)
            part.metadata.setdefault("imported_from", str(source))
            if path.suffix.lower() == ".npz":
                save_pairs(path, part, inputs=[source])
            else:
                save_pairs_extxyz(path, part, inputs=[source])
            written.append(f"{path} ({len(part)} pairs)")
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"imported {len(pairset)} pairs ({resolved}); wrote " + ", ".join(written), err=True)


@data.command("split")
@click.argument("pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for train/val/test .npz files, or a .json file for indices only.",
)
@click.option(
    "--method",
    default="chemsys",
    show_default=True,
    type=click.Choice(["random", "chemsys"]),
    help="random pairs, or whole chemical systems per split (unseen test chemistries).",
)
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True, callback=_fractions, help="train,val,test fractions.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--extend",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A directory with an existing chemical-system split (train/val/test.npz): new pairs join the split "
    "their chemical system is already in, new systems are shared out by --fractions, and -o gets old + new.",
)
def split_cmd(pairs, output, method, fractions, seed, extend):
    """Split a pair file into train/val/test (or extend an existing split with it)."""
    from e3relax_ase.training.data.pairs import PairSet, save_pairs
    from e3relax_ase.training.data.splits import DEFAULT_NAMES, split_by_chemical_system, split_keeping_systems, split_random

    pairset = _load(pairs)
    existing = {}
    if extend is not None:
        if method != "chemsys":
            raise click.BadParameter("extending works for chemical-system splits only", param_hint="--method")
        if output.suffix.lower() == ".json" or output.resolve() == extend.resolve():
            raise click.BadParameter("give a new directory: the existing split is never overwritten", param_hint="-o")
        existing = {name: _load(extend / f"{name}.npz") for name in DEFAULT_NAMES if (extend / f"{name}.npz").exists()}
        if not existing:
            raise click.BadParameter(f"no train/val/test.npz in {extend}", param_hint="--extend")
        known = set().union(*(part.ids.tolist() for part in existing.values()))
        repeated = sorted(set(pairset.ids.tolist()) & known)
        if repeated:
            raise click.ClickException(f"{len(repeated)} pair id(s) of {pairs} are already in {extend}, e.g. {repeated[0]}")
        try:
            splits = split_keeping_systems(pairset, existing, fractions=fractions, seed=seed)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        splitter = split_by_chemical_system if method == "chemsys" else split_random
        splits = splitter(pairset, fractions=fractions, seed=seed)
    record = {"method": method, "fractions": list(fractions), "seed": seed, "from": pairs.name}
    if extend is not None:
        record["extends"] = str(extend)
    if output.suffix.lower() == ".json":
        if output.resolve() == pairs.resolve():
            raise click.ClickException(f"refusing to overwrite input {pairs}")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"split": record, **{k: v.tolist() for k, v in splits.items()}}))
    else:
        try:
            for name, indices in splits.items():
                part = pairset.subset(indices)
                if name in existing:
                    part = PairSet.concatenate([existing[name], part])
                part.metadata["split"] = {**record, "name": name}
                save_pairs(output / f"{name}.npz", part, inputs=[pairs, *(extend / f"{n}.npz" for n in existing)] if extend else [pairs])
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    sizes = ", ".join(f"{name} {'+' if extend else ''}{len(idx)}" for name, idx in splits.items())
    click.echo(f"{method} split of {len(pairset)} pairs (seed {seed}): {sizes} -> {output}", err=True)


@data.command("card")
@click.argument("splits", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Markdown file.")
@click.option("--title", default="Pair dataset", show_default=True)
@click.option("--source-name", default=None, help="Default: the files' metadata 'source'.")
@click.option("--teacher", default=None, help="Default: the files' metadata 'teacher'.")
@click.option("--licence", default=None, help="Default: the files' metadata 'licence'.")
@click.option("--citation", default=None, help="Default: the files' metadata 'citation'.")
@click.option("--how", "how_made", default=None, help="How the pairs were made.")
@click.option("--split-rule", default=None, help="How the splits were made (default: from metadata).")
@click.option(
    "--match-sample",
    default=300,
    show_default=True,
    type=click.IntRange(min=0),
    help="StructureMatcher subsample per split.",
)
@click.option("--seed", default=0, show_default=True, type=int)
def card_cmd(splits, output, title, source_name, teacher, licence, citation, how_made, split_rule, match_sample, seed):
    """Write a Markdown data card for SPLITS (pair files; split name = file stem)."""
    from e3relax_ase.training.data.datacard import write_data_card

    if any(p.resolve() == output.resolve() for p in splits):
        raise click.ClickException(f"refusing to overwrite input {output}")
    parts = {p.stem: _load(p) for p in splits}
    meta = next(iter(parts.values())).metadata
    if split_rule is None and "split" in meta:
        s = meta["split"]
        split_rule = f"method {s.get('method')}, fractions {s.get('fractions')}, seed {s.get('seed')}"
    metrics = write_data_card(
        output,
        None,
        parts,
        title=title,
        source=source_name or meta.get("source", "unknown"),
        teacher=teacher or meta.get("teacher", "unknown"),
        licence=licence or meta.get("licence", "unknown"),
        citation=citation or meta.get("citation"),
        how_made=how_made,
        split_rule=split_rule,
        match_sample=match_sample,
        seed=seed,
    )
    for name, m in metrics.items():
        if m.get("n_pairs"):
            click.echo(
                f"{name}: {m['n_pairs']} pairs, Dummy coord MAE {m['coord_mae_mean']:.3f} Å, volume MAE "
                f"{m['volume_mae']:.1f} Å^3, match {m['match_n_matched']}/{m['match_n_tested']}",
                err=True,
            )
    click.echo(f"wrote {output}", err=True)


@data.command("plot")
@click.argument("pairs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory.")
@click.option("--prefix", default="", help="File name prefix.")
def plot_cmd(pairs, output, prefix):
    """Save displacement and volume-change histograms of PAIRS (joined) as PNG."""
    from e3relax_ase.training.data.datacard import plot_statistics
    from e3relax_ase.training.data.pairs import PairSet

    pairset = PairSet.concatenate([_load(p) for p in pairs])
    for path in plot_statistics(pairset, output, prefix=prefix):
        click.echo(f"wrote {path}", err=True)


def _mix(ctx, param, value):
    from e3relax_ase.training.distill.inputs.plan import DEFAULT_MIX, GENERATORS

    if value is None:
        return tuple(sorted(DEFAULT_MIX.items()))
    try:
        mix = {k.strip(): float(v) for k, v in (item.split("=") for item in value.split(","))}
    except ValueError:
        raise click.BadParameter("expected NAME=SHARE,... e.g. symmetric=0.35,substituted=0.25") from None
    unknown = set(mix) - set(GENERATORS)
    if unknown or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise click.BadParameter(f"generators are {', '.join(GENERATORS)}, with non-negative shares")
    return tuple(sorted(mix.items()))


def _pair_of_floats(ctx, param, value):
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected LOW,HIGH") from None
    if not 0 <= low <= high:
        raise click.BadParameter("need 0 <= LOW <= HIGH")
    return (low, high)


@data.command("make-inputs")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Inputs .npz (with OUTPUT.info.json.gz and OUTPUT.manifest.json beside it).",
)
@click.option("--n", "n_inputs", required=True, type=click.IntRange(min=0), help="Inputs drawn from the mix.")
@click.option("--seed", default=0, show_default=True, type=int, help="Input k is made from rng([seed, k]).")
@click.option("--mix", default=None, callback=_mix, help="Generator shares, e.g. symmetric=0.35,substituted=0.25,layered=0.15,supercell=0.25 (the default).")
@click.option("--min-atoms", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-atoms", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--volume-range", default="0.65,1.35", show_default=True, callback=_pair_of_floats, help="Start: isotropic volume factor bounds.")
@click.option("--max-shear", default=0.15, show_default=True, type=click.FloatRange(0, 0.49), help="Start: largest shear.")
@click.option("--rattle", default="0.02,0.3", show_default=True, callback=_pair_of_floats, help="Start: rattle standard deviation bounds, Å.")
@click.option(
    "--min-per-element",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Top up until every covered element (Z <= 83, no noble gases, no Pm) is in this many inputs.",
)
@click.option("--large-share", default=0.0, show_default=True, type=click.FloatRange(0, 0.95), help="Top up until this share of inputs has more than 24 atoms.")
@click.option(
    "--element-volumes",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="fit-volumes JSON for the volume guesses (default: covalent radii).",
)
@click.option(
    "--extend-splits",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory with train/val/test.npz: each input gets the split its chemical system has there, new systems are shared out by --fractions.",
)
@click.option("--fractions", default="0.9,0.05,0.05", show_default=True, callback=_fractions)
@click.option("--id-prefix", default="sn0c-", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes (same output for any).")
def make_inputs_cmd(
    output,
    n_inputs,
    seed,
    mix,
    min_atoms,
    max_atoms,
    volume_range,
    max_shear,
    rattle,
    min_per_element,
    large_share,
    element_volumes,
    extend_splits,
    fractions,
    id_prefix,
    workers,
):
    """Generate user-like inputs for distillation: random symmetric crystals, substituted
    prototypes, slabs and layered cells, supercells; all with hard starts (docs/data.md)."""
    import sys

    from e3relax_ase.training.distill.inputs.input_set import assign_splits, write_input_set
    from e3relax_ase.training.distill.inputs.plan import InputPlan, make_input_set

    if output.exists() and extend_splits is not None and output.resolve().parent == extend_splits.resolve():
        raise click.ClickException(f"refusing to write into the split directory {extend_splits}")
    try:
        plan = InputPlan(
            n=n_inputs,
            seed=seed,
            mix=mix,
            min_atoms=min_atoms,
            max_atoms=max_atoms,
            volume_range=volume_range,
            max_shear=max_shear,
            rattle_range=rattle,
            min_per_element=min_per_element,
            large_share=large_share,
            id_prefix=id_prefix,
            element_volumes=str(element_volumes) if element_volumes else None,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    results, report = make_input_set(plan, n_workers=workers)
    if not results:
        raise click.ClickException("no input could be made")
    extra = {"command": " ".join(["e3relax-ase", *sys.argv[1:]]) if sys.argv else None}
    if extend_splits is not None:
        assign_splits(results, extend_splits, fractions=fractions, seed=0)
        extra["splits"] = {"extends": str(extend_splits), "fractions": list(fractions), "seed": 0}
    manifest = write_input_set(output, results, plan, report, extra)
    summary = manifest["summary"]
    click.echo(
        f"wrote {summary['inputs']} inputs ({summary['atoms']} atoms, {summary['share_more_than_24_atoms']:.1%} with > 24 atoms, "
        f"every element in >= {summary['elements_min']}; quotas {'met' if report['quota_met'] else 'NOT met'}; "
        f"{report['failed']} failed) to {output} ({manifest['bytes'] / 2**20:.1f} MiB) in {report['wall_s']:.0f} s",
        err=True,
    )
