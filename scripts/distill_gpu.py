"""Distil (unrelaxed, relaxed) training pairs from SevenNet-0 on one GPU, with batched FIRE.

Subcommands (run ``python scripts/distill_gpu.py SUBCOMMAND --help``):

  make-inputs  (here, CPU; needs ase + pymatgen) perturbed user-like crystals -> compact npz
               (float32 positions/cells, what the GPU run reads) + a JSON sidecar with the seed
               id and perturbation of every input (stays here).
  trim-wheel   (here) copy of the sevenn wheel without the checkpoints other than SevenNet-0,
               so wheels + inputs fit what one device call can carry.
  bench        (GPU) teacher calls per second and atom-steps per second at several batch sizes.
  relax        (GPU; needs torch, sevenn, ase only) streams the inputs through the batched
               relaxer until a time budget, writing raw results to --out-dir every --save-every
               seconds (atomic renames; rotating part files under --part-mib) and a JSON log.
  finalize     (here) raw parts + inputs + sidecar -> the pair file(s) and RUNLOG.json, keeping
               only converged and sane pairs.

The GPU subcommands import nothing beyond numpy, torch, sevenn (and the ase it imports).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e3relax_ase.io.files import atomic_write  # noqa: E402

logger = logging.getLogger("distill_gpu")

STATUS_CODES = {"converged": 0, "max_steps": 1, "nonfinite": 2, "diverged": 3}

# --------------------------------------------------------------------------------------------
# Chemistry for decorating AFLOW prototypes (MP-like chemistries, Z <= 83, no Tc/Pm/noble gases)
# --------------------------------------------------------------------------------------------
METALS = [
    "Li",
    "Be",
    "Na",
    "Mg",
    "Al",
    "K",
    "Ca",
    "Sc",
    "Ti",
    "V",
    "Cr",
    "Mn",
    "Fe",
    "Co",
    "Ni",
    "Cu",
    "Zn",
    "Ga",
    "Ge",
    "Rb",
    "Sr",
    "Y",
    "Zr",
    "Nb",
    "Mo",
    "Ru",
    "Rh",
    "Pd",
    "Ag",
    "Cd",
    "In",
    "Sn",
    "Sb",
    "Cs",
    "Ba",
    "La",
    "Ce",
    "Pr",
    "Nd",
    "Sm",
    "Eu",
    "Gd",
    "Tb",
    "Dy",
    "Ho",
    "Er",
    "Tm",
    "Yb",
    "Lu",
    "Hf",
    "Ta",
    "W",
    "Re",
    "Os",
    "Ir",
    "Pt",
    "Au",
    "Hg",
    "Tl",
    "Pb",
    "Bi",
]
METALLOIDS = ["B", "Si", "As", "Te"]
ANION_CLASSES = {  # class: (weight, anion elements)
    "oxide": (0.30, ["O"]),
    "halide": (0.14, ["F", "Cl", "Br", "I"]),
    "chalcogenide": (0.14, ["S", "Se", "Te"]),
    "nitride": (0.08, ["N"]),
    "pnictide": (0.05, ["P", "As", "Sb"]),
    "hydride": (0.02, ["H"]),
    "carbide": (0.02, ["C"]),
}
INTERMETALLIC_WEIGHT = 0.25
ELEMENTAL_POOL = METALS + METALLOIDS + ["C", "P", "S", "Se", "N", "O", "H", "F", "Cl", "Br", "I"]
SEVENNET0_NUMBERS = set(range(1, 84)) | set(range(89, 95))  # type map of 7net-0

SOURCE_FRACTIONS = {"aflow": 0.58, "perov_5": 0.25, "carbon_24": 0.12, "dcdft": 0.05}


def _atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays), binary=True, suffix=".npz")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


# --------------------------------------------------------------------------------------------
# make-inputs
# --------------------------------------------------------------------------------------------


def _supercell_to(atoms, min_atoms: int):
    """Double the cell along its shortest lattice vector until it holds >= min_atoms atoms."""
    reps = np.ones(3, dtype=int)
    lengths = atoms.cell.lengths().copy()
    while len(atoms) * reps.prod() < min_atoms:
        k = int(np.argmin(lengths * reps))
        reps[k] *= 2
    return atoms.repeat(tuple(reps)) if reps.prod() > 1 else atoms.copy(), reps.tolist()


def _min_contact_ratio(positions: np.ndarray, cell: np.ndarray, radii: np.ndarray, cutoff: float) -> float:
    """min over pairs (periodic images included, within ``cutoff`` Å) of distance / (r_i + r_j)."""
    inv = np.linalg.inv(cell)
    frac = positions @ inv
    wrapped = (frac - np.floor(frac)) @ cell
    n_rep = np.ceil(cutoff * np.linalg.norm(inv, axis=0)).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in n_rep], indexing="ij"), -1).reshape(-1, 3)
    shifts = grid @ cell
    diff = wrapped[None, :, None, :] - wrapped[:, None, None, :] + shifts[None, None]  # [i, j, s, 3]
    dist = np.linalg.norm(diff, axis=-1)
    centre = int(np.flatnonzero(np.all(grid == 0, axis=1))[0])
    idx = np.arange(len(positions))
    dist[idx, idx, centre] = np.inf
    ratio = dist / (radii[:, None, None] + radii[None, :, None])
    return float(ratio.min())


def _scale_to_covalent_contact(atoms, target: float = 1.0):
    """Scale the cell isotropically so the closest pair sits at ``target`` x the covalent-radius sum."""
    from ase.data import covalent_radii

    ratio = _min_contact_ratio(atoms.positions, atoms.cell.array, covalent_radii[atoms.numbers], cutoff=5.0)
    if not np.isfinite(ratio) or ratio <= 0:
        return None
    out = atoms.copy()
    out.set_cell(atoms.cell.array * (target / ratio), scale_atoms=True)
    return out


def decorate_prototype(atoms, rng: np.random.Generator):
    """Put an MP-like chemistry onto a prototype: one species -> anion, the others -> distinct cations.

    Returns:
        (decorated atoms at covalent contact, record dict) or (None, None) if it cannot be placed.
    """
    from ase.data import atomic_numbers

    species, counts = np.unique(atoms.numbers, return_counts=True)
    k = len(species)
    if k == 1:
        chemistry = "elemental"
        mapping = {int(species[0]): str(rng.choice(ELEMENTAL_POOL))}
    else:
        names = list(ANION_CLASSES) + ["intermetallic"]
        weights = np.array([ANION_CLASSES[n][0] for n in ANION_CLASSES] + [INTERMETALLIC_WEIGHT])
        chemistry = str(rng.choice(names, p=weights / weights.sum()))
        order = rng.permutation(k)
        if chemistry == "intermetallic":
            pool = METALS + METALLOIDS
            picks = rng.choice(pool, size=k, replace=False)
            mapping = {int(species[o]): str(e) for o, e in zip(order, picks)}
        else:
            anion = str(rng.choice(ANION_CLASSES[chemistry][1]))
            most = np.flatnonzero(counts == counts.max())
            anion_species = int(species[rng.choice(most)])
            cation_pool = [e for e in METALS + METALLOIDS if e != anion]
            picks = rng.choice(cation_pool, size=k - 1, replace=False)
            mapping = {anion_species: anion}
            for z, e in zip([int(s) for s in species if int(s) != anion_species], picks):
                mapping[z] = str(e)
    out = atoms.copy()
    out.numbers = np.array([atomic_numbers[mapping[int(z)]] for z in atoms.numbers])
    out = _scale_to_covalent_contact(out)
    if out is None:
        return None, None
    from ase.data import chemical_symbols

    record = {"chemistry": chemistry, "mapping": {chemical_symbols[z]: e for z, e in mapping.items()}}
    return out, record


def _load_seeds(source: str):
    from e3relax_ase.training.data.seeds import load_seed_structures

    seeds = load_seed_structures(source)
    return [s for s in seeds if {int(z) for z in s.numbers} <= SEVENNET0_NUMBERS]


def fit_volumes(args) -> None:
    """Per-element volumes fitted on a pair file's relaxed cells -> JSON ({symbol: Å^3 per atom})."""
    from ase.data import chemical_symbols

    from e3relax_ase.training.data.pairs import load_pairs
    from e3relax_ase.training.data.perturb import fit_element_volumes

    pairs = load_pairs(args.pairs)
    volumes = fit_element_volumes(pairs)
    table = {chemical_symbols[z]: round(v, 6) for z, v in sorted(volumes.items())}
    document = {
        "fitted_on": Path(args.pairs).name,
        "pairs": len(pairs.ids),
        "unit": "A^3 per atom",
        "rule": "non-negative least squares of V_relaxed ~ sum of per-atom volumes, rows / V_relaxed",
        "volumes": table,
    }
    _atomic_write_text(Path(args.out), json.dumps(document, indent=1))
    logger.info("fitted %d element volumes on %d pairs -> %s", len(table), len(pairs.ids), args.out)


def _read_element_volumes(path: str | None) -> dict[int, float] | None:
    if path is None:
        return None
    from ase.data import atomic_numbers

    table = json.loads(Path(path).read_text())["volumes"]
    return {atomic_numbers[symbol]: float(v) for symbol, v in table.items()}


def make_inputs(args) -> None:
    """Seeds -> decorated/supercelled -> perturbed inputs -> compact npz + JSON sidecar."""
    from e3relax_ase.training.data.perturb import blend_compound_volume, make_user_like_inputs

    rng = np.random.default_rng(args.seed)
    element_volumes = _read_element_volumes(args.element_volumes)
    sources = args.sources.split(",") if args.sources else list(SOURCE_FRACTIONS)
    unknown = set(sources) - set(SOURCE_FRACTIONS)
    if unknown:
        raise SystemExit(f"--sources: unknown {', '.join(sorted(unknown))}; known: {', '.join(SOURCE_FRACTIONS)}")
    if args.sources:  # the chosen sources keep their relative shares
        counts = {s: round(SOURCE_FRACTIONS[s] / sum(SOURCE_FRACTIONS[t] for t in sources) * args.n) for s in sources}
    else:  # as the committed input sets were made
        counts = {s: round(f * args.n) for s, f in SOURCE_FRACTIONS.items()}
    records = []  # (atoms, info)
    for source, n_wanted in counts.items():
        t0 = time.time()
        seeds = [s for s in _load_seeds(source) if len(s) <= args.max_atoms]
        logger.info("%s: %d seeds loaded in %.0f s", source, len(seeds), time.time() - t0)
        made = 0
        attempts = 0
        while made < n_wanted and attempts < 5 * n_wanted:
            attempts += 1
            seed = seeds[int(rng.integers(len(seeds)))]
            base = seed.copy()
            base.info = dict(seed.info)
            decoration = None
            if source == "aflow":
                base, decoration = decorate_prototype(seed, rng)
                if base is None:
                    continue
                base.info = dict(seed.info)
            base, reps = _supercell_to(base, args.min_atoms)
            if len(base) > args.max_atoms:
                continue
            substitute_p = 0.5 if source == "perov_5" else 0.0
            (atoms,) = make_user_like_inputs(
                [base],
                1,
                rng,
                strain_magnitude=float(rng.uniform(0.0, args.max_strain)),
                rattle_stdev=float(rng.uniform(*args.rattle)),
                volume_range=tuple(args.volume_range),
                substitute_probability=substitute_p,
                allowed_elements=sorted(SEVENNET0_NUMBERS),
            )
            if not {int(z) for z in atoms.numbers} <= SEVENNET0_NUMBERS:
                continue
            volume_guess = None
            if element_volumes is not None:
                # After the random volume factor, so the inputs' volumes still scatter around the guess.
                atoms, volume_guess = blend_compound_volume(atoms, element_volumes)
            from e3relax_ase.training.distill.batched_results import min_interatomic_distance

            if min_interatomic_distance(atoms.positions, atoms.cell.array, cutoff=1.0) <= 0.5:
                continue
            info = {"source": source, "seed_id": atoms.info["seed_id"], "perturbation": atoms.info["perturbation"]}
            if decoration is not None:
                info["perturbation"]["decoration"] = decoration
            if reps != [1, 1, 1]:
                info["perturbation"]["supercell"] = reps
            if volume_guess is not None:
                info["perturbation"]["volume_guess"] = volume_guess
            records.append((atoms, info))
            made += 1
        logger.info("%s: %d inputs (%d attempts) in %.0f s", source, made, attempts, time.time() - t0)

    order = rng.permutation(len(records))
    records = [records[i] for i in order]
    ids = np.array([f"{args.id_prefix}{k:06d}" for k in range(len(records))])
    n_atoms = np.array([len(a) for a, _ in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
    numbers = np.concatenate([a.numbers for a, _ in records]).astype(np.uint8)
    positions = np.concatenate([a.positions for a, _ in records]).astype(np.float32)
    cells = np.stack([a.cell.array for a, _ in records]).astype(np.float32)
    out = Path(args.out)
    _atomic_savez(out, ids=ids, n_atoms=n_atoms, offsets=offsets, numbers=numbers, positions=positions, cells=cells)
    sidecar = {str(i): info for i, (_, info) in zip(ids, records)}
    with gzip.open(str(out) + ".info.json.gz", "wt") as f:
        json.dump(sidecar, f)
    logger.info("wrote %d inputs (%d atoms) to %s (%.1f MiB)", len(ids), len(numbers), out, out.stat().st_size / 2**20)


# --------------------------------------------------------------------------------------------
# trim-wheel
# --------------------------------------------------------------------------------------------


def trim_wheel(args) -> None:
    """Rewrite a sevenn wheel without the pretrained checkpoints other than --keep, fixing RECORD."""
    import zipfile

    src = Path(args.wheel)
    dst = Path(args.out_dir) / src.name
    tmp = dst.with_suffix(".tmp")
    kept_records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        dropped = [
            n
            for n in names
            if ("/pretrained_potentials/" in n and f"/{args.keep}/" not in n and not n.endswith(".py")) or n.endswith(".so") or "/pair_e3gnn/" in n
        ]
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for n in names:
            if n in dropped or n == record_name:
                continue
            zout.writestr(zin.getinfo(n), zin.read(n))
        for line in zin.read(record_name).decode().splitlines():
            if line and line.split(",")[0] not in dropped:
                kept_records.append(line)
        zout.writestr(record_name, "\n".join(kept_records) + "\n")
    os.replace(tmp, dst)
    if dst.resolve() != src.resolve() and args.remove_original:
        src.unlink()
    logger.info("trimmed %s: dropped %d files, %.1f MiB", dst, len(dropped), dst.stat().st_size / 2**20)


# --------------------------------------------------------------------------------------------
# GPU side: shared helpers
# --------------------------------------------------------------------------------------------


def _load_inputs(path: str):
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def _input_stream(inp, start: int, stop: int, feed_until: float | None = None):
    """RelaxInput per input index in [start, stop); stops early once time.time() > feed_until."""
    from e3relax_ase.training.distill.batched_results import RelaxInput

    off = inp["offsets"]
    for k in range(start, stop):
        if feed_until is not None and time.time() > feed_until:
            return
        a, b = off[k], off[k + 1]
        yield RelaxInput(
            numbers=inp["numbers"][a:b].astype(np.int64),
            positions=inp["positions"][a:b].astype(np.float64),
            cell=inp["cells"][k].astype(np.float64),
            key=k,
        )


def _device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import sevenn

        info["sevenn"] = sevenn.__version__
    except ImportError:
        pass
    return info


def _make_teacher(device: str):
    from e3relax_ase.training.distill.teacher_sevennet import SevenNetTeacher

    return SevenNetTeacher("7net-0", device=device)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def bench(args) -> None:
    """Run the streaming relaxer for --seconds at each atom budget; report rates."""
    import torch

    from e3relax_ase.training.distill.batched_relax import relax_stream
    from e3relax_ase.training.distill.batched_results import FireParams, RelaxStats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _load_inputs(args.inputs)
    teacher = _make_teacher(device)
    params = FireParams(fresh_check=True)
    warm = RelaxStats()
    for _ in relax_stream(_input_stream(inp, 0, 64), teacher, params, max_atoms=1024, device=device, stats=warm, stop=lambda: warm.n_calls >= 3):
        pass
    report = {"device": _device_info(), "runs": []}
    start = args.offset
    for max_atoms in args.max_atoms:
        stats = RelaxStats()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        deadline = t0 + args.seconds
        try:
            results = list(
                relax_stream(
                    _input_stream(inp, start, len(inp["ids"])),
                    teacher,
                    params,
                    max_atoms=max_atoms,
                    device=device,
                    stats=stats,
                    stop=lambda deadline=deadline: time.time() > deadline,
                )
            )
        except torch.OutOfMemoryError:
            report["runs"].append({"max_atoms": max_atoms, "error": "out of GPU memory"})
            print(json.dumps(report["runs"][-1]), flush=True)
            torch.cuda.empty_cache()
            break
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - t0
        conv = [r.n_steps for r in results if r.converged]
        run = {
            "max_atoms": max_atoms,
            "seconds": round(elapsed, 1),
            "teacher_calls": stats.n_calls,
            "steps_per_s": round(stats.n_calls / elapsed, 2),
            "atom_steps_per_s": round(stats.n_atom_evals / elapsed, 1),
            "structure_steps_per_s": round(stats.n_graph_evals / elapsed, 1),
            "mean_structures_per_call": round(stats.n_graph_evals / max(stats.n_calls, 1), 1),
            "finished": stats.n_finished,
            "converged": stats.n_converged,
            "median_steps_converged_so_far": float(np.median(conv)) if conv else None,
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        }
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        start = (start + args.stride) % len(inp["ids"])  # fresh inputs for the next batch size
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out_dir:
        _atomic_write_text(Path(args.out_dir) / "bench.json", json.dumps(report, indent=1))


# --------------------------------------------------------------------------------------------
# relax (production)
# --------------------------------------------------------------------------------------------


class _RawWriter:
    """Accumulates finished results; rewrites the current part file atomically; rotates parts."""

    def __init__(self, out_dir: Path, part_mib: float, positions_dtype: str):
        self.out_dir = out_dir
        self.part_bytes = part_mib * 2**20
        self.dtype = np.float64 if positions_dtype == "float64" else np.float32
        self.part = 0
        self._reset()
        self.status_index: list[int] = []
        self.status_code: list[int] = []
        self.status_steps: list[int] = []

    def _reset(self):
        self.index, self.positions, self.cells = [], [], []
        self.energy, self.fmax, self.fmax_fresh, self.steps = [], [], [], []
        self.raw_bytes = 0

    def add(self, r) -> None:
        self.status_index.append(int(r.key))
        self.status_code.append(STATUS_CODES[r.status])
        self.status_steps.append(int(r.n_steps))
        if r.status != "converged":
            return
        self.index.append(int(r.key))
        self.positions.append(r.positions.astype(self.dtype))
        self.cells.append(r.cell)
        self.energy.append(r.energy)
        self.fmax.append(r.fmax)
        self.fmax_fresh.append(r.fmax_fresh)
        self.steps.append(r.n_steps)
        self.raw_bytes += r.positions.size * np.dtype(self.dtype).itemsize + 120

    def flush(self) -> None:
        if self.index:
            _atomic_savez(
                self.out_dir / f"raw_{self.part:02d}.npz",
                index=np.array(self.index, dtype=np.int64),
                positions=np.concatenate(self.positions),
                cells=np.stack(self.cells),
                energy=np.array(self.energy),
                fmax=np.array(self.fmax),
                fmax_fresh=np.array(self.fmax_fresh),
                n_steps=np.array(self.steps, dtype=np.int64),
            )
        _atomic_savez(
            self.out_dir / "status.npz",
            index=np.array(self.status_index, dtype=np.int64),
            status=np.array(self.status_code, dtype=np.int8),
            n_steps=np.array(self.status_steps, dtype=np.int32),
        )
        # Compressed size is ~0.9x raw for float data: rotate before a part nears the limit.
        if self.raw_bytes > self.part_bytes:
            self.part += 1
            self._reset()


def relax(args) -> None:
    """Production: stream inputs through the batched relaxer until the time budget."""
    import torch

    from e3relax_ase.training.distill.batched_relax import relax_stream
    from e3relax_ase.training.distill.batched_results import FireParams, RelaxStats

    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inp = _load_inputs(args.inputs)
    teacher = _make_teacher(device)
    params = FireParams(fmax=args.fmax, max_steps=args.max_steps, fresh_check=True)
    t_loop = time.time()
    deadline = t_start + args.time_budget
    feed_until = deadline - args.drain
    stats = RelaxStats()
    writer = _RawWriter(out_dir, args.part_mib, args.positions_dtype)
    stop = min(len(inp["ids"]), args.offset + (args.limit or len(inp["ids"])))
    stream = relax_stream(
        _input_stream(inp, args.offset, stop, feed_until),
        teacher,
        params,
        max_atoms=args.max_atoms,
        device=device,
        stats=stats,
        stop=lambda: time.time() > deadline,
    )
    log = {
        "device": _device_info(),
        "max_atoms": args.max_atoms,
        "fmax": args.fmax,
        "max_steps": args.max_steps,
        "inputs": Path(args.inputs).name,
        "offset": args.offset,
    }
    last_save = time.time()

    def write_log(final: bool):
        now = time.time()
        loop_s = now - t_loop
        n_conv = stats.n_converged
        codes = np.array(writer.status_code, dtype=int)
        steps = np.array(writer.status_steps)
        conv_steps = steps[codes == 0]
        log.update(
            {
                "final": final,
                "wall_s_total": round(now - t_start, 1),
                "startup_s": round(t_loop - t_start, 1),
                "loop_s": round(loop_s, 1),
                "teacher_calls": stats.n_calls,
                "steps_per_s": round(stats.n_calls / max(loop_s, 1e-9), 3),
                "atom_steps_per_s": round(stats.n_atom_evals / max(loop_s, 1e-9), 1),
                "structure_steps_per_s": round(stats.n_graph_evals / max(loop_s, 1e-9), 1),
                "mean_structures_per_call": round(stats.n_graph_evals / max(stats.n_calls, 1), 1),
                "finished": stats.n_finished,
                "converged": n_conv,
                "status_counts": {s: int((codes == c).sum()) for s, c in STATUS_CODES.items()},
                "converged_fraction_of_finished": round(n_conv / max(stats.n_finished, 1), 4),
                "converged_pairs_per_hour_loop": round(3600 * n_conv / max(loop_s, 1e-9)),
                "converged_pairs_per_hour_incl_startup": round(3600 * n_conv / max(now - t_start, 1e-9)),
                "median_steps_converged": float(np.median(conv_steps)) if len(conv_steps) else None,
                "mean_steps_converged": float(np.mean(conv_steps)) if len(conv_steps) else None,
                "inputs_consumed_upto": int(max(writer.status_index, default=args.offset)),
                "raw_parts": writer.part + 1,
            }
        )
        if device == "cuda":
            log["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        _atomic_write_text(out_dir / "relax_log.json", json.dumps(log, indent=1))
        print(
            json.dumps({k: log[k] for k in ("loop_s", "steps_per_s", "atom_steps_per_s", "finished", "converged", "converged_pairs_per_hour_loop")}), flush=True
        )

    for result in stream:
        writer.add(result)
        now = time.time()
        if now - last_save > args.save_every:
            writer.flush()
            write_log(final=False)
            last_save = now
    writer.flush()
    write_log(final=True)


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------


def finalize(args) -> None:
    """Raw GPU results -> pair file(s) of converged, sane pairs + RUNLOG.json."""
    from e3relax_ase.keys import MIN_DISTANCE, VOLUME_RATIO_RANGE
    from e3relax_ase.training.data.pairs import PairSet, save_pairs
    from e3relax_ase.training.distill.batched_results import (
        RelaxResult,
        check_sane,
        min_interatomic_distance,
    )

    inp = _load_inputs(args.inputs)
    with gzip.open(args.inputs + ".info.json.gz", "rt") as f:
        sidecar = json.load(f)
    raw_dirs = [Path(d) for d in args.raw_dir]
    off = inp["offsets"]
    pairs = []
    rejected: dict[str, int] = {}
    logs, statuses, seen = [], [], set()
    for raw_dir in raw_dirs:
        for part in sorted(raw_dir.glob("raw_*.npz")):
            with np.load(part, allow_pickle=False) as d:
                raw = {k: d[k] for k in d.files}
            repeated = seen.intersection(raw["index"].tolist())
            if repeated:  # two runs over overlapping --offset/--limit ranges: refuse rather than keep twins
                raise SystemExit(f"{part}: input {min(repeated)} was already relaxed in another raw folder")
            seen.update(raw["index"].tolist())
            n_atoms = inp["n_atoms"][raw["index"]]
            roff = np.concatenate([[0], np.cumsum(n_atoms)])
            for r, k in enumerate(raw["index"]):
                a, b = off[k], off[k + 1]
                result = RelaxResult(
                    key=int(k),
                    numbers=inp["numbers"][a:b].astype(np.int64),
                    positions_init=inp["positions"][a:b].astype(np.float64),
                    cell_init=inp["cells"][k].astype(np.float64),
                    positions=raw["positions"][roff[r] : roff[r + 1]].astype(np.float64),
                    cell=raw["cells"][r],
                    energy=float(raw["energy"][r]),
                    fmax=float(raw["fmax"][r]),
                    fmax_fresh=float(raw["fmax_fresh"][r]),
                    n_steps=int(raw["n_steps"][r]),
                    converged=True,
                    status="converged",
                )
                problem = check_sane(result)
                if problem is None and min_interatomic_distance(result.positions_init, result.cell_init, 1.0) <= MIN_DISTANCE:
                    problem = "min_distance_input"
                if problem is not None:
                    rejected[problem] = rejected.get(problem, 0) + 1
                    continue
                pairs.append(result)
        logs.append(json.loads((raw_dir / "relax_log.json").read_text()))
        with np.load(raw_dir / "status.npz", allow_pickle=False) as d:
            statuses.append(d["status"])
    pairs.sort(key=lambda p: p.key)
    log = logs[0] if len(logs) == 1 else {"device": logs[0]["device"], "runs": logs}
    status = np.concatenate(statuses)
    teacher_version = log["device"].get("sevenn", "?")
    sources = sorted({sidecar[str(inp["ids"][p.key])]["source"] for p in pairs})
    metadata = {
        "teacher": f"SevenNet-0 (sevenn {teacher_version})",
        "teacher_model": "7net-0 (SevenNet_0__11Jul2024 checkpoint inside the sevenn wheel), float32",
        "fmax": args.fmax,
        "fmax_definition": "max row norm of FrechetCellFilter generalised forces (ASE semantics, cell rows "
        "included) < fmax, and also < fmax on a fresh filter (Cartesian forces, virial/n_atoms)",
        "max_steps": args.max_steps,
        "optimizer": "batched FIRE + Frechet cell filter (e3relax_ase.training.distill.batched_relax; ASE 3.29 "
        "FIRE/FrechetCellFilter defaults: dt 0.1, maxstep 0.2, dtmax 1.0, Nmin 5, finc 1.1, fdec 0.5, "
        "astart 0.1, fa 0.99, exp_cell_factor n_atoms)",
        "seed_sources": sources,
        "inputs": "e3relax-ase data make-inputs (e3relax_ase.training.distill.inputs; parameters in the inputs' manifest and each pair's info)"
        if any(s.startswith("generator:") for s in sources)
        else "seeds perturbed by e3relax_ase.training.data.perturb (rattle 0.05-0.15 A, symmetric strain "
        "<= 5 %, volume x0.85-1.2; perov_5 element substitution p=0.5; AFLOW prototypes decorated with "
        "MP-like chemistries scaled to covalent contact), supercells to >= 4 atoms, <= 32 atoms",
        "volume_guess": (
            "compounds: cell rescaled to the geometric mean of the perturbed volume and the sum of "
            "per-element volumes (fit-volumes on the sevennet0_distilled train split); elemental cells "
            "keep the perturbed volume"
            if any("volume_guess" in sidecar[str(inp["ids"][p.key])]["perturbation"] for p in pairs)
            else "none: covalent-contact scaling and the random volume factor only"
        ),
        "sanity": f"finite, det(cell) > 0, min distance > {MIN_DISTANCE:g} A (both structures), "
        f"V_relaxed/V_unrelaxed in [{VOLUME_RATIO_RANGE[0]:g}, {VOLUME_RATIO_RANGE[1]:g}]",
        "licence": "Teacher SevenNet-0 (sevenn, MIT; trained on MPtrj, Materials Project data, CC BY 4.0). "
        "Seeds: perov_5 and carbon_24 as distributed in the cdvae repository (MIT); AFLOW prototypes "
        "shipped in pymatgen (MIT; Mehl et al., AFLOW prototype encyclopedia); ASE dcdft collection "
        "(LGPL-2.1+). Cite SevenNet (Park et al., J. Chem. Theory Comput. 2024) when using these pairs.",
        "device": log["device"],
        "finished": len(status),
        "converged": int((status == 0).sum()),
        "kept": len(pairs),
        "rejected_after_convergence": rejected,
    }
    ids, infos = [], []
    for p in pairs:
        pid = str(inp["ids"][p.key])
        side = sidecar[pid]
        ids.append(pid)
        infos.append(
            {
                "seed_id": side["seed_id"],
                "source": side["source"],
                "perturbation": side["perturbation"],
                # inputs from `e3relax-ase data make-inputs` also carry their generator's
                # parameters, seed, chemical system and planned split
                **{k: side[k] for k in ("generator", "rng", "chemical_system", "split") if k in side},
                "steps": p.n_steps,
                "converged": True,
                "fmax": round(p.fmax, 5),
                "fmax_fresh": round(p.fmax_fresh, 5),
            }
        )
    out = Path(args.out)
    n_files = max(1, int(np.ceil(_estimate_bytes(pairs) / (args.max_mib * 2**20))))
    chunks = np.array_split(np.arange(len(pairs)), n_files)
    written = []
    for c, idx in enumerate(chunks):
        sel = [pairs[i] for i in idx]
        n = np.array([len(p.numbers) for p in sel], dtype=np.int64)
        pairset = PairSet(
            ids=np.array([ids[i] for i in idx]),
            n_atoms=n,
            offsets=np.concatenate([[0], np.cumsum(n)]),
            numbers=np.concatenate([p.numbers for p in sel]),
            pos_unrelaxed=np.concatenate([p.positions_init for p in sel]),
            pos_relaxed=np.concatenate([p.positions for p in sel]),
            cell_unrelaxed=np.stack([p.cell_init for p in sel]),
            cell_relaxed=np.stack([p.cell for p in sel]),
            pbc=np.ones((len(sel), 3), dtype=bool),
            energy_per_atom_relaxed=np.array([p.energy / len(p.numbers) for p in sel]),
            metadata=dict(metadata, part=f"{c + 1}/{n_files}"),
            info=[infos[i] for i in idx],
        )
        path = out if n_files == 1 else out.with_name(f"{out.stem}_{c:02d}{out.suffix}")
        save_pairs(path, pairset)
        written.append(path.name)
    runlog = {"relax_log": log, "pairs_files": written, "kept_pairs": len(pairs), "rejected_after_convergence": rejected, "bench": None}
    bench_path = Path(args.bench) if args.bench else None
    if bench_path and bench_path.exists():
        runlog["bench"] = json.loads(bench_path.read_text())
    runlog.update(json.loads(args.extra) if args.extra else {})
    _atomic_write_text(Path(args.runlog), json.dumps(runlog, indent=1))
    logger.info("kept %d pairs in %s; rejected %s", len(pairs), written, rejected)


def _estimate_bytes(pairs) -> float:
    n_atoms = sum(len(p.numbers) for p in pairs)
    return n_atoms * (8 + 48) * 0.85 + len(pairs) * (150 + 400)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-inputs", help="perturbed inputs -> compact npz (CPU, here)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-atoms", type=int, default=4)
    p.add_argument("--max-atoms", type=int, default=32)
    p.add_argument("--max-strain", type=float, default=0.05)
    p.add_argument("--rattle", type=float, nargs=2, default=(0.05, 0.15))
    p.add_argument("--volume-range", type=float, nargs=2, default=(0.85, 1.2))
    p.add_argument(
        "--element-volumes",
        default=None,
        help="JSON from fit-volumes: compounds' volumes become the geometric mean of their perturbed volume and the per-element guess",
    )
    p.add_argument(
        "--sources",
        default=None,
        help=f"seed sources to use, of {','.join(SOURCE_FRACTIONS)} (default all, in those shares; a subset keeps their relative shares)",
    )
    p.add_argument(
        "--id-prefix", default="sn0-", help="pair ids are PREFIX + 6-digit index; a new input set that will join an existing dataset needs its own prefix"
    )
    p.set_defaults(func=make_inputs)

    p = sub.add_parser("fit-volumes", help="per-element volumes from a pair file -> JSON (here)")
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=fit_volumes)

    p = sub.add_parser("trim-wheel", help="sevenn wheel without unused checkpoints")
    p.add_argument("--wheel", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--keep", default="SevenNet_0__11Jul2024")
    p.add_argument("--remove-original", action="store_true")
    p.set_defaults(func=trim_wheel)

    p = sub.add_parser("bench", help="steps/s at several batch sizes (GPU)")
    p.add_argument("--inputs", required=True)
    p.add_argument("--max-atoms", type=int, nargs="+", default=[2048, 8192, 24576])
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--stride", type=int, default=20000, help="input offset between batch sizes")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=bench)

    p = sub.add_parser("relax", help="production relaxation to a time budget (GPU)")
    p.add_argument("--inputs", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--time-budget", type=float, required=True, help="seconds from start, startup included")
    p.add_argument("--drain", type=float, default=60.0, help="stop feeding new inputs this long before the end")
    p.add_argument("--max-atoms", type=int, default=8192)
    p.add_argument("--fmax", type=float, default=0.02)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--save-every", type=float, default=60.0)
    p.add_argument("--part-mib", type=float, default=13.0)
    p.add_argument("--positions-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=relax)

    p = sub.add_parser("finalize", help="raw parts -> pair file(s) + RUNLOG.json (here)")
    p.add_argument("--inputs", required=True)
    p.add_argument("--raw-dir", required=True, nargs="+", help="one or more raw folders (disjoint input ranges)")
    p.add_argument("--out", required=True)
    p.add_argument("--runlog", required=True)
    p.add_argument("--bench", default=None)
    p.add_argument("--fmax", type=float, default=0.02)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--max-mib", type=float, default=15.0)
    p.add_argument("--extra", default=None, help="JSON dict merged into RUNLOG.json")
    p.set_defaults(func=finalize)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("e3relax_ase.training.data.perturb").setLevel(logging.WARNING)  # one line per input otherwise
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
