"""``OneShotRelaxer``: relax ASE Atoms or pymatgen Structures in one forward pass of E3Relax-H2.

    relaxer = OneShotRelaxer()                      # "default" checkpoint, device "auto"
    relaxed = relaxer.relax(atoms)                  # a NEW Atoms; inplace=True mutates
    relaxed = relaxer.relax(atoms, refine=EMT())    # then real forces until fmax < 0.05
    many = relaxer.relax_many(structures)           # batched by an edge budget

Every structure is validated first (``e3relax_ase.geometry.validation``), every prediction is
sanity-checked (``e3relax_ase.relax.sanity``) and applied through the structure's constraints
(``e3relax_ase.io.structures``); ``atoms.info`` receives the provenance keys listed in
``e3relax_ase.io.structures``. docs/relaxer.md is the user guide.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from e3relax_ase import __version__
from e3relax_ase.geometry.canonical import CanonicalForm
from e3relax_ase.geometry.crystal import CrystalArrays
from e3relax_ase.geometry.graph import graph_from_edges
from e3relax_ase.geometry.validation import (
    MIN_DISTANCE,
    InvalidStructureError,
    StructureReport,
    structure_name,
)
from e3relax_ase.io.checkpoint import CheckpointInfo, load_checkpoint
from e3relax_ase.io.structures import (
    INFO_CLUSTER,
    INFO_CORRECTION_RATIO,
    INFO_LAST_CORRECTION,
    INFO_MAX_DISPLACEMENT,
    INFO_MAX_STRAIN,
    INFO_MODEL,
    INFO_PRECISION,
    INFO_PROBLEMS,
    INFO_REFINE_ADVISED,
    INFO_RELAX_CELL,
    INFO_SANE,
    INFO_SHA256,
    INFO_SPACEGROUP,
    INFO_SPACEGROUP_INPUT,
    INFO_UNTRAINED,
    INFO_VACUUM_AXES,
    INFO_VERSION,
    apply_prediction,
    as_atoms,
    clear_provenance,
    copy_atoms,
    crystal_arrays,
    from_atoms,
    spacegroup_number,
    vacuum_cell_mask,
)
from e3relax_ase.keys import ISOLATION_MARGIN
from e3relax_ase.nn.compiled import CompiledForward
from e3relax_ase.nn.graphed import GraphedForward
from e3relax_ase.nn.model import E3RelaxH2
from e3relax_ase.nn.precision import check_precision
from e3relax_ase.relax.heap import keep_freed_heap
from e3relax_ase.relax.predict import Prediction, ReadyPredictions, predict
from e3relax_ase.relax.threads import torch_threads
from e3relax_ase.relax.workers import (
    PREFETCH_ITEMS,
    UNNAMED,
    PreparationSettings,
    StructureSpec,
    collect_verdicts,
    graph_edges,
    judge_here,
    judge_prediction,
    named,
    pool_is_broken,
    prefetched,
    prepare_structure,
    prepared_in_pool,
    start_worker_pool,
    submit_judging,
)

logger = logging.getLogger(__name__)

# Peak memory of a forward pass, per graph edge and feature channel, in units of the float size.
# Measured on CPU at F = 128 and 512: about 16 float32 / 12 float64 values; 24 leaves a margin.
BYTES_PER_EDGE_CHANNEL = 24
MEMORY_FRACTION = 0.5  # share of the free device memory the default edge budget may use
# Default structures per forward pass on CUDA. Unbounded, a long list became a few huge chunks,
# and the worker processes sat idle while the main process ran each one (forward, judging,
# writing back). On an H200, 16,384 small crystals with 12 workers: 3,144 structures/s
# unbounded, 2,585 / 3,380 / 3,478 with 512 / 1,024 / 2,048 (benchmarks/README.md).
CUDA_BATCH_STRUCTURES = 2048


class PredictionError(RuntimeError):
    """A prediction failed its sanity checks and ``on_insane="raise"`` was asked for."""


@dataclass
class RelaxFailure:
    """Stands in the output of ``relax_many(errors="return")`` for a structure that failed."""

    index: int
    name: str
    error: Exception

    @property
    def message(self) -> str:
        return str(self.error)


@dataclass
class _Chunk:
    """One forward pass's structures on their way: launched (``pending``, or the ``error`` that
    launching raised, kept to be raised in order), then predicted (``predictions``) with their
    judging under way in the workers (``judging``: the tasks), or, when it failed early, its
    results (``done``)."""

    items: list
    pending: Any = None
    error: Exception | None = None
    predictions: list | None = None
    judging: list | None = None
    done: dict | None = None


@dataclass
class _Item:
    """One structure on its way through ``relax_many``."""

    index: int
    given_name: str | None  # None: named on demand from ``source`` (messages only)
    kind: str  # "ase" | "pymatgen"
    atoms: Any  # the Atoms that receives the prediction
    pristine: Any  # an untouched copy of the input (trajectories only; None otherwise)
    arrays: CrystalArrays
    report: StructureReport
    form: CanonicalForm | None = None  # the canonical form validation searched
    edges: tuple | None = None  # the graph's (src, dst, shift), local atom indices
    source: Any = None  # the input as given, to name it on demand
    vacuum: Any = None  # its vacuum.VacuumLayout when a periodic axis holds vacuum (``arrays`` are then as the network sees it)

    def seen_by_network(self, layout) -> None:
        """Record a vacuum layout: a slab's vacuum axes become non-periodic and its atoms sit
        together (an allowed cluster is relaxed as given, keeping its box)."""
        self.vacuum = layout
        if layout is not None and not layout.cluster:
            self.arrays = CrystalArrays(self.arrays.numbers, layout.positions, self.arrays.cell, layout.pbc)

    @property
    def keeps_cell(self) -> bool:
        """An allowed cluster keeps its box whatever ``relax_cell`` says."""
        return self.vacuum is not None and self.vacuum.cluster

    @property
    def name(self) -> str:
        if self.given_name is None:
            self.given_name = _name_of(self.source, self.index)
        return self.given_name


@dataclass
class _Options:
    relax_cell: bool = True
    fix_symmetry: bool = False
    symprec: float = 0.01
    return_trajectory: bool = False
    on_insane: str = "warn"
    refine: Any = None
    refine_kwargs: dict = field(default_factory=dict)
    pool: Any = None  # worker processes (num_workers > 0) that also judge predictions
    settings: Any = None  # the call's PreparationSettings
    provenance: dict = field(default_factory=dict)  # the info keys common to every structure (_provenance), once a call


@dataclass
class _Raise:
    """An exception to raise in order (``errors="raise"``) when its structure's turn comes."""

    error: Exception


def _available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_edge_budget(device: torch.device, dtype: torch.dtype, num_channels: int) -> int:
    """Graph edges one forward pass may hold: ``MEMORY_FRACTION`` of the free memory."""
    per_edge = BYTES_PER_EDGE_CHANNEL * torch.finfo(dtype).bits // 8 * num_channels
    return max(1000, int(MEMORY_FRACTION * _available_memory(device) / per_edge))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available (no CUDA); use device='cpu'")
    return device


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float64 if device.type == "cpu" else torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dtype


def _model_info(model: E3RelaxH2, name: str) -> CheckpointInfo:
    """A CheckpointInfo for a model held in memory (its sha256 is that of its weights)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return CheckpointInfo(path="<in memory>", sha256=digest.hexdigest(), config=model.config, versions={}, metadata={"name": name}, name=name)


class OneShotRelaxer:
    """Predict relaxed structures with an E3Relax-H2 checkpoint.

    Attributes:
        model: the network, on ``device`` in ``dtype``.
        info: the checkpoint's ``CheckpointInfo`` (name, sha256, metadata, untrained).
        device, dtype: where and in which precision the network runs.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | E3RelaxH2 = "default",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        *,
        batch_size: int | None = None,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        min_distance: float = MIN_DISTANCE,
        reduce_cell: bool = True,
        precision: str = "float32",
        cuda_graphs: bool = True,
        compile: bool = False,
    ):
        """
        Args:
            checkpoint: "default", a registry name, a checkpoint path, or an ``E3RelaxH2``.
            device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
            dtype: "auto" (float64 on CPU, float32 on CUDA), float32 or float64.
            batch_size: most structures per forward pass; default 1 on CPU (bitwise results
                whatever the batch; batching gains little there), ``CUDA_BATCH_STRUCTURES``
                (2,048) on CUDA, within the memory budget.
            max_atoms: most atoms per forward pass (None: no limit beyond ``max_edges``).
            max_edges: most graph edges per forward pass; default from the free memory.
                A structure alone over it is refused (``InvalidStructureError``).
            min_distance: inputs with atoms closer than this (Å) are refused.
            reduce_cell: Niggli-reduce 3D-periodic cells before the network.
            precision: "float32" (default), "tf32" (CUDA tensor cores) or "bf16" (autocast)
                for the network's channel mixing; geometry stays float32. Needs dtype
                float32. docs/relaxer.md gives the measured speed and deviation of each.
            cuda_graphs: on CUDA, run batches of up to ``graphed.GRAPHED_MAX_ATOMS`` atoms
                (single structures, short lists) by replaying a CUDA graph captured once
                per size bucket: their time is kernel launches, not arithmetic. False runs
                every batch eagerly.
            compile: run the network's message passing compiled by ``torch.compile``
                (``e3relax_ase.nn.compiled``) for every batch that does not replay a CUDA graph.
                The first batch waits for the compilation (about 12 s on an H200 host, 10 s
                on a 2-core CPU), later ones run faster: at the paper's size with TF32, 1.9x
                the forward pass. For long runs; outputs agree with the eager pass to
                rounding. Needs Triton on CUDA, a C++ compiler on a CPU.

        Raises:
            CheckpointError: the checkpoint cannot be loaded.
            ValueError: an unavailable device or unsupported dtype.
        """
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.precision = check_precision(precision, self.dtype)
        if isinstance(checkpoint, E3RelaxH2):
            model, info = checkpoint, _model_info(checkpoint, "in-memory")
        else:
            model, info = load_checkpoint(checkpoint, map_location="cpu")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self._graphed = GraphedForward(self.model) if cuda_graphs and self.device.type == "cuda" else None
        self._compiled = CompiledForward(self.model) if compile else None
        if self.device.type == "cpu":
            keep_freed_heap()  # no page faults on every forward pass (e3relax_ase.relax.heap)
        self.info = info
        self.batch_size = batch_size if batch_size is not None else (1 if self.device.type == "cpu" else CUDA_BATCH_STRUCTURES)
        self.max_atoms = max_atoms
        self.max_edges = max_edges or default_edge_budget(self.device, self.dtype, self.model.config.num_channels)
        self._batch_edges = self.max_edges  # lowered after an out-of-memory split
        self.min_distance = min_distance
        self.reduce_cell = reduce_cell
        if info.untrained:
            logger.warning("checkpoint %r is UNTRAINED (random weights): its predictions are meaningless", info.name)

    def __repr__(self) -> str:
        extra = "" if self.precision == "float32" else f", precision={self.precision!r}"
        extra += ", compile=True" if self._compiled is not None else ""
        return f"OneShotRelaxer(checkpoint={self.info.name!r}, device={str(self.device)!r}, dtype={self.dtype}{extra})"

    # --- validation ------------------------------------------------------------------------
    def validate(self, structure, name: str | None = None, allow_cluster: bool = False) -> StructureReport:
        """Check a structure as ``relax`` would, without running the network.

        Raises:
            InvalidStructureError: naming the structure and the problem.
        """
        atoms, _ = as_atoms(structure)
        return self._prepare_atoms(atoms, name or structure_name(atoms), self._settings(allow_cluster))[0].report

    def _prepare_atoms(self, atoms, name: str, settings: PreparationSettings):
        """``workers.prepare_structure`` on an Atoms: (PreparedCrystal, VacuumLayout or None)."""
        arrays = atoms.arrays
        others = {key: value for key, value in arrays.items() if key not in ("numbers", "positions")}
        return prepare_structure(arrays["numbers"], arrays["positions"], atoms.cell.array, atoms.pbc, name=name, per_atom_arrays=others, settings=settings)

    def _settings(self, allow_cluster: bool = False) -> PreparationSettings:
        config = self.model.config
        checks = {
            "cutoff": config.cutoff,
            "max_neighbors": config.max_neighbors,
            "elements": self.info.metadata.get("elements"),
            "max_atomic_number": config.max_atomic_number,
            "min_distance": self.min_distance,
            "max_edges": self.max_edges,
            "reduce": self.reduce_cell,
        }
        # Vacuum at least as thick as the cutoff: no graph edge crosses it (e3relax_ase.geometry.vacuum).
        # The same margin as the isolation rule: a gap of exactly the cutoff is vacuum whatever rounding adds.
        return PreparationSettings(checks, vacuum_gap=config.cutoff - ISOLATION_MARGIN, allow_cluster=allow_cluster)

    # --- public API ------------------------------------------------------------------------
    def relax(self, structure, **options):
        """Relax one structure; returns the same type it was given (a new object by default).

        Keyword arguments are those of :meth:`relax_many` (``errors`` and ``names``
        excepted; ``name=`` sets how messages call the structure). With
        ``return_trajectory=True`` returns ``(relaxed, frames)``: the input, then one frame
        per network layer.

        Raises:
            InvalidStructureError: the input is refused (message names the problem).
            PredictionError: with ``on_insane="raise"`` and a failed sanity check.
        """
        if "errors" in options:
            raise TypeError("relax() raises on failure; use relax_many(errors='return') to collect failures")
        return self.relax_many([structure], names=[options.pop("name", None) or _name_of(structure, None)], **options)[0]

    def relax_many(
        self,
        structures: Iterable,
        *,
        relax_cell: bool = True,
        fix_symmetry: bool = False,
        symprec: float = 0.01,
        inplace: bool = False,
        return_trajectory: bool = False,
        on_insane: str = "warn",
        errors: str = "raise",
        names: list[str] | None = None,
        batch_size: int | None = None,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        refine=None,
        fmax: float = 0.05,
        steps: int = 500,
        optimizer="FIRE",
        cell_filter="FrechetCellFilter",
        scalar_pressure: float = 0.0,
        mask=None,
        trajectory=None,
        logfile=None,
        prefetch: bool = False,
        num_workers: int = 0,
        allow_cluster: bool = False,
        progress=False,
    ) -> list:
        """Relax many structures, batched on the device within the atom/edge budget.

        Args:
            structures: ASE Atoms and/or pymatgen Structures (any iterable, read lazily).
            relax_cell: apply the predicted cell; False keeps each input cell (the predicted
                fractional coordinates are placed in it).
            fix_symmetry: keep each input's space group (found at ``symprec``) through
                ASE's FixSymmetry, during the jump and any refinement; the constraint is
                removed again afterwards and the space group is checked with spglib.
            symprec: symmetry tolerance, Å.
            inplace: change the given Atoms instead of returning new ones (ASE input only).
            return_trajectory: return ``(relaxed, frames)`` per structure.
            on_insane: a prediction failing a sanity check is "warn" (kept, flagged, logged;
                a non-finite one falls back to the input geometry), "input" (input geometry
                kept, flagged) or "raise" (``PredictionError``).
            errors: "raise" stops at the first failing structure; "return" puts a
                :class:`RelaxFailure` in its place and carries on.
            names: how messages name each structure (default: ``info["name"]`` or formula).
            batch_size, max_atoms, max_edges: this call's budget per forward pass (default:
                the relaxer's); a structure over it still runs alone, validation keeps the
                relaxer's ``max_edges`` as the per-structure limit.
            refine: an ASE calculator (or factory, or name) to continue from the prediction
                with real forces; then fmax, steps, optimizer, cell_filter, scalar_pressure
                (eV/Å^3), mask, trajectory (a path, where "{index}" and "{name}" are replaced
                for each structure, or an open ASE Trajectory that every refinement appends
                to) and logfile apply, as in :func:`e3relax_ase.relax.refine.refine`.
            prefetch: prepare (validate, canonicalise, search neighbours) the next
                structures in a background thread while the network runs; results are the
                same either way. The input is then read up to ``PREFETCH_ITEMS`` structures
                ahead of the one being relaxed (also past one that fails). Off by default:
                preparation is Python holding the GIL, and on CPU the forward pass lost more
                waiting for the GIL than it gained (benchmarks/bench_pipeline.py).
            num_workers: prepare in this many worker processes instead, which also run the
                sanity checks and confidence of the predictions (for long lists). The
                workers are forked where the platform allows (spawned elsewhere) on first
                use and kept for later calls; ``close()`` stops them. Results are the same
                as with 0. With workers and the network on CUDA (and no ``refine``), torch
                runs this process's CPU work on one thread during the call (restored after;
                process-wide while it lasts): its idle OpenMP threads otherwise spin on the
                workers' cores (``e3relax_ase.relax.threads.torch_threads``).
            allow_cluster: an isolated cluster or molecule in a periodic box (vacuum along
                every periodic axis, ``e3relax_ase.geometry.vacuum``) is relaxed keeping its box
                instead of refused. A structure with vacuum along some periodic axes is
                always relaxed with those lattice vectors kept, with a warning.
            progress: True shows a tqdm bar on stderr (structures done, structures/s); an
                object with ``update(n)`` (e.g. a tqdm bar of your own) is updated instead.

        Returns:
            One result per input, in input order, of the type given.
        """
        if on_insane not in ("warn", "input", "raise"):
            raise ValueError(f"on_insane must be 'warn', 'input' or 'raise', got {on_insane!r}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        refine_kwargs = {
            "fmax": fmax,
            "steps": steps,
            "optimizer": optimizer,
            "cell_filter": cell_filter,
            "scalar_pressure": scalar_pressure,
            "mask": mask,
            "trajectory": trajectory,
            "logfile": logfile,
        }
        options = _Options(relax_cell, fix_symmetry, symprec, return_trajectory, on_insane, refine, refine_kwargs)
        options.provenance = self._provenance(relax_cell)
        options.settings = self._settings(allow_cluster)
        budget = (
            batch_size if batch_size is not None else self.batch_size,
            max_atoms if max_atoms is not None else self.max_atoms,
            min(max_edges, self._batch_edges) if max_edges is not None else self._batch_edges,
        )
        bar, own_bar = _progress_bar(progress, structures)
        results: dict[int, Any] = _Results(bar.update) if bar is not None else {}
        keep_pristine = bool(return_trajectory)
        if num_workers and num_workers > 0:
            options.pool = self._worker_pool(int(num_workers))
            source = self._pooled(structures, names, inplace, keep_pristine, errors, options, int(num_workers))
        else:
            source = self._prepared(structures, names, inplace, keep_pristine, errors, options.settings)
            if prefetch and not (hasattr(structures, "__len__") and len(structures) <= 1):
                source = prefetched(source, PREFETCH_ITEMS)
        frozen = _freeze_garbage_collection()
        host_threads = contextlib.nullcontext()
        if options.pool is not None and self.device.type == "cuda" and refine is None:
            host_threads = torch_threads(1)  # the workers need the cores (e3relax_ase.relax.threads)
        try:
            with host_threads:
                self._run_chunks(source, budget, options, errors, results)
        finally:
            if frozen:
                gc.unfreeze()
            source.close()
            if options.pool is not None and pool_is_broken(options.pool):
                self.close()  # a worker died: start afresh next time
            if own_bar:
                bar.close()
        if isinstance(trajectory, (str, os.PathLike)) and not _per_structure(trajectory) and len(results) > 1:
            logger.warning("one refinement trajectory file for %d structures keeps only the last; put {index} or {name} in its name", len(results))
        return [results[index] for index in sorted(results)]

    @property
    def has_worker_pool(self) -> bool:
        """Whether worker processes of an earlier ``relax_many(num_workers=...)`` are running."""
        return getattr(self, "_workers", None) is not None

    def close(self) -> None:
        """Stop the worker processes of ``relax_many(num_workers=...)`` (they are kept for the
        next call; they also stop when the relaxer is garbage-collected or Python exits)."""
        workers, self._workers = getattr(self, "_workers", None), None
        if workers is not None:
            workers[2].detach()
            workers[1].shutdown(wait=False, cancel_futures=True)

    # --- internals -------------------------------------------------------------------------
    def _run_chunks(self, source: Iterator, budget: tuple, options: _Options, errors: str, results: dict) -> None:
        """Group the prepared items of ``source`` into forward passes within ``budget`` and put
        each structure's result in ``results``.

        A chunk's forward pass is launched as soon as the chunk is full, queued behind the one
        still running, and only then is that earlier one completed: the GPU goes from one pass
        to the next while this process maps the earlier predictions back, finishes the chunk
        before it and reads on. With workers, a completed chunk's predictions are judged there
        meanwhile; it is finished at the next chunk boundary (``_Chunk``, ``_advance``). On
        CUDA the freed memory of a queued pass is reused by the next in stream order, so two
        passes in flight need no more memory than one.
        """
        pending: list[_Item] = []
        pending_atoms = pending_edges = 0  # running totals: the budget check stays O(1) per structure
        launched: _Chunk | None = None
        being_judged: _Chunk | None = None
        source_error = None
        items = iter(source)
        while True:
            try:
                index, item = next(items)
            except StopIteration:
                break
            except Exception as exc:
                # A later input failed (errors="raise"): the structures before it are finished
                # first, so that a failure among them, an earlier one, is the one raised.
                source_error = exc
                break
            if isinstance(item, RelaxFailure):
                results[index] = item
                continue
            n_atoms, n_edges = item.report.n_atoms, item.report.n_edges
            if pending and not self._fits(len(pending) + 1, pending_atoms + n_atoms, pending_edges + n_edges, *budget):
                to_complete, earlier = launched, being_judged
                launched = self._launch(pending)
                being_judged = self._advance(to_complete, earlier, options, errors, results)
                pending, pending_atoms, pending_edges = [], 0, 0
            pending.append(item)
            pending_atoms += n_atoms
            pending_edges += n_edges
        if pending:
            to_complete, earlier = launched, being_judged
            launched = self._launch(pending)
            being_judged = self._advance(to_complete, earlier, options, errors, results)
        being_judged = self._advance(launched, being_judged, options, errors, results)
        if being_judged is not None:
            results.update(self._end_chunk(being_judged, options, errors))
        if source_error is not None:
            raise source_error

    def _worker_pool(self, num_workers: int):
        """The worker processes, started on first use and kept while ``num_workers`` is the same."""
        workers = getattr(self, "_workers", None)
        if workers is not None and workers[0] == num_workers and not pool_is_broken(workers[1]):
            return workers[1]
        self.close()
        pool = start_worker_pool(num_workers)
        self._workers = (num_workers, pool, weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True))
        return pool

    def _prepare(self, index: int, name: str | None, structure, inplace: bool, keep_pristine: bool, settings: PreparationSettings) -> _Item:
        """Validate, canonicalise and search one structure here. ``name`` None: named only if
        a message needs it (a formula costs ~12 µs)."""
        atoms, kind = _input_atoms(structure, inplace)
        try:
            prepared, layout = self._prepare_atoms(atoms, name if name is not None else UNNAMED, settings)
        except InvalidStructureError as exc:
            renamed = named(exc, lambda: _name_of(structure, index))
            if renamed is exc:
                raise
            raise renamed from None
        arrays = crystal_arrays(atoms)
        edges = graph_edges(prepared, settings)
        work, pristine = _work_copies(atoms, kind, inplace, keep_pristine)
        item = _Item(index, name, kind, work, pristine, arrays, prepared.report, prepared.form, edges, source=structure)
        item.seen_by_network(layout)
        return item

    def _prepared(self, structures, names, inplace: bool, keep_pristine: bool, errors: str, settings: PreparationSettings) -> Iterator:
        """(index, _Item or RelaxFailure) for each input, in order, prepared here."""
        for index, structure in enumerate(structures):
            try:
                item = self._prepare(index, names[index] if names is not None else None, structure, inplace, keep_pristine, settings)
            except Exception as exc:
                if errors == "raise":
                    raise
                item = RelaxFailure(index, _given_name(names, structure, index), exc)
            yield index, item

    def _pooled(self, structures, names, inplace: bool, keep_pristine: bool, errors: str, options: _Options, num_workers: int) -> Iterator:
        """``_prepared``, with validation, canonical form and neighbour search in worker processes.

        This process converts and copies each structure (``_shell``) and sends its arrays; the
        workers run the same functions on the same numbers, so the items are the same
        (e3relax_ase.relax.workers).
        """

        def shell(index: int, structure):
            return self._shell(index, structure, names, inplace, keep_pristine, errors, options.settings)

        entries = prepared_in_pool(structures, shell, options.pool, num_workers, options.settings)
        try:
            for index, entry, outcome in entries:
                if isinstance(entry, _Raise):
                    raise entry.error
                if isinstance(outcome, Exception):
                    if errors == "raise":
                        raise outcome
                    entry = RelaxFailure(index, entry.name, outcome)
                elif outcome is not None:
                    entry.report, entry.form, entry.edges, layout = outcome
                    entry.seen_by_network(layout)
                yield index, entry
        finally:
            entries.close()  # cancels the tasks still in flight

    def _shell(self, index: int, structure, names, inplace: bool, keep_pristine: bool, errors: str, settings: PreparationSettings):
        """Everything of ``_prepare`` that needs the Atoms object, and the arrays a worker checks.

        Returns (shell _Item, StructureSpec) for a worker, or a finished _Item / RelaxFailure
        (a _Raise for ``errors="raise"``) when the structure fails here or its arrays are not
        regular (prepared here, as ``_prepared``).
        """
        try:
            name = names[index] if names is not None else None  # named on demand
            atoms, kind = _input_atoms(structure, inplace)
            numbers = np.asarray(atoms.arrays["numbers"])
            positions = np.asarray(atoms.arrays["positions"], dtype=np.float64)
            cell = np.asarray(atoms.cell.array, dtype=np.float64)
            pbc = np.asarray(atoms.pbc, dtype=bool).reshape(-1)
            lengths = {key: len(value) for key, value in atoms.arrays.items() if key not in ("numbers", "positions")}
            regular = (
                len(numbers) > 0
                and positions.shape == (len(numbers), 3)
                and cell.shape == (3, 3)
                and pbc.shape == (3,)
                and numbers.dtype.kind in "iu"
                and all(n == len(numbers) for n in lengths.values())
            )
            if not regular:  # refused by the first checks: no need for a worker
                return self._prepare(index, _given_name(names, structure, index), structure, inplace, keep_pristine, settings)
            # crystal_arrays(atoms), from the arrays read above (the same copies, read once)
            arrays = CrystalArrays(np.array(numbers, dtype=np.int64), np.array(positions), np.array(cell), np.array(pbc))
            work, pristine = _work_copies(atoms, kind, inplace, keep_pristine)
            shell = _Item(index, name, kind, work, pristine, arrays, None, source=structure)
            return shell, StructureSpec(arrays.numbers, arrays.positions, arrays.cell, arrays.pbc, name, lengths)
        except Exception as exc:
            if errors == "raise":
                return _Raise(exc)
            return RelaxFailure(index, _given_name(names, structure, index), exc)

    def _fits(self, n_structures: int, n_atoms: int, n_edges: int, batch_size, max_atoms, max_edges) -> bool:
        """Whether one forward pass may take this many structures, atoms and edges."""
        if batch_size is not None and n_structures > batch_size:
            return False
        if max_atoms is not None and n_atoms > max_atoms:
            return False
        return n_edges <= min(max_edges, self._batch_edges)

    def _predict(self, items: list[_Item]):
        """One forward pass, launched: its ``result()`` waits for the predictions. On out of
        memory the batch is split in two and each half retried (waiting for them)."""
        try:
            with torch.inference_mode():  # not even no_grad's bookkeeping: ~3 % of a small CPU pass
                return self._forward(items)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            edges = sum(i.report.n_edges for i in items)
            if len(items) == 1:
                raise InvalidStructureError(
                    f"{items[0].name}: out of memory on {self.device} with {items[0].report.n_atoms} atoms and about {edges} edges"
                ) from None
            # Later batches start below the size that failed (a lone structure always runs).
            self._batch_edges = max(1, min(self._batch_edges, edges // 2))
            half = len(items) // 2
            logger.info("out of memory on %d structures (%d edges); splitting the batch", len(items), edges)
            return ReadyPredictions(self._predict(items[:half]).result() + self._predict(items[half:]).result())

    def _forward(self, items: list[_Item]):
        """``predict`` on the items, with the canonical forms and edges prepared for them (when
        every item has them), not waiting for the device (``predict.PendingPredictions``)."""
        crystals = [i.arrays for i in items]
        forms = graph = None  # predict computes them
        if all(i.form is not None and i.edges is not None for i in items):
            forms = [i.form for i in items]
            graph = graph_from_edges(
                [c.numbers for c in crystals],
                [f.positions for f in forms],
                [f.cell for f in forms],
                [c.pbc for c in crystals],
                [i.edges for i in items],
                self.dtype,
            )
        return predict(
            self.model,
            crystals,
            self.device,
            self.dtype,
            self.reduce_cell,
            forms=forms,
            graph=graph,
            precision=self.precision,
            wait=False,
            forward=[self._graphed, self._compiled],
        )

    def _advance(self, launched: _Chunk | None, earlier: _Chunk | None, options: _Options, errors: str, results: dict) -> _Chunk | None:
        """Complete the ``launched`` chunk (wait for its predictions, send them to be judged),
        then finish the ``earlier`` one (its judging ran meanwhile).

        Returns the completed chunk while the workers judge it, None when it is finished
        already (or there was none). Results do not depend on this order. The earlier chunk is
        finished even when completing fails, and its failure is the one raised, so
        ``errors="raise"`` still raises the first failing structure.
        """
        if launched is None:
            return earlier
        try:
            chunk = self._complete(launched, options, errors)
        finally:
            if earlier is not None:
                results.update(self._end_chunk(earlier, options, errors))
        if chunk.judging is not None:
            return chunk
        results.update(self._end_chunk(chunk, options, errors))
        return None

    def _run_chunk(self, items: list[_Item], options: _Options, errors: str) -> dict:
        """Predict, judge and finish ``items`` (one forward pass): {index: result}."""
        return self._end_chunk(self._complete(self._launch(items), options, errors), options, errors)

    def _launch(self, items: list[_Item]) -> _Chunk:
        """Queue the forward pass of ``items`` (on CUDA it runs while this process reads on).

        Never raises: a failure is kept in the chunk, and ``_complete`` raises or handles it in
        its turn, after the chunks before it.
        """
        try:
            return _Chunk(items, pending=self._predict(items))
        except Exception as exc:
            return _Chunk(items, error=exc)

    def _complete(self, chunk: _Chunk, options: _Options, errors: str) -> _Chunk:
        """Wait for a launched chunk's predictions, and send their judging to the workers when
        there are some."""
        items = chunk.items
        try:
            if chunk.error is not None:
                raise chunk.error
            predictions = chunk.pending.result()
        except Exception as exc:
            if errors == "raise":
                raise
            if len(items) == 1:
                return _Chunk(items, done={items[0].index: RelaxFailure(items[0].index, items[0].name, exc)})
            # Isolate the structure that broke the batch: every other one still gets its result.
            logger.warning("a batch of %d structures failed (%s); retrying them one at a time", len(items), exc)
            out = {}
            for item in items:
                out.update(self._run_chunk([item], options, errors))
            return _Chunk(items, done=out)
        chunk = _Chunk(items, predictions=predictions)
        if options.pool is not None:
            try:
                chunk.judging = self._submit_judging(items, predictions, options)
            except Exception as exc:  # e.g. a worker died: judge here instead, the same way
                logger.warning("judging predictions in worker processes failed (%s); judging them here", exc)
        return chunk

    def _end_chunk(self, chunk: _Chunk, options: _Options, errors: str) -> dict:
        """Finish a started chunk: apply each judged prediction to its Atoms. {index: result}."""
        if chunk.done is not None:
            return chunk.done
        judged = None
        if chunk.judging is not None:
            try:
                judged = collect_verdicts(chunk.judging)
            except Exception as exc:
                logger.warning("judging predictions in worker processes failed (%s); judging them here", exc)
        if judged is None:
            judged = self._judge_here(chunk.items, chunk.predictions, options)
        out = {}
        for item, prediction, verdict in zip(chunk.items, chunk.predictions, judged):
            try:
                out[item.index] = self._finish(item, prediction, options, verdict)
            except Exception as exc:
                if errors == "raise":
                    raise
                out[item.index] = RelaxFailure(item.index, item.name, exc)
        return out

    def _submit_judging(self, items: list[_Item], predictions: list[Prediction], options: _Options) -> list:
        """Send the judging of every item to the worker processes; the tasks."""
        return submit_judging(options.pool, predictions, *self._judged_inputs(items), options.relax_cell, self.min_distance)

    def _judge_here(self, items: list[_Item], predictions: list[Prediction], options: _Options) -> list:
        """The verdicts of ``_submit_judging``, computed in this process (the same function).
        Should packing the batch fail, each item is judged alone in ``_finish``."""
        try:
            return judge_here(predictions, *self._judged_inputs(items), options.relax_cell, self.min_distance)
        except Exception:  # noqa: BLE001 (e.g. a prediction of the wrong shape: that item fails alone)
            return [None] * len(items)

    def _judged_inputs(self, items: list[_Item]) -> tuple[list, list]:
        """What judging needs of each item: its input arrays, and a lower bound on its pair distances."""
        return [item.arrays for item in items], [self._closest(item) for item in items]

    def _closest(self, item: _Item) -> float:
        """A lower bound on every input pair distance: validation's closest pair, or the cutoff."""
        return min(item.report.min_distance, self.model.config.cutoff)

    def _finish(self, item: _Item, prediction: Prediction, options: _Options, verdict=None):
        """Sanity-check, apply, optionally refine, record provenance; return the caller's type.

        ``verdict``: the item's (SanityReport, Confidence) from ``sanity.judge_batch`` (here or in
        a worker), or its exception; None judges it here alone (``judge_prediction``).
        """
        positions, cell = prediction.positions[-1], prediction.cell[-1]
        relax_cell = options.relax_cell and not item.keeps_cell
        if item.vacuum is not None and not item.vacuum.cluster:
            positions = positions - item.vacuum.translation  # back to the caller's images
        if verdict is None or relax_cell != options.relax_cell:  # an allowed cluster is judged keeping its box
            arrays = item.arrays
            verdict = judge_prediction(
                prediction.positions,
                prediction.cell,
                arrays.positions,
                arrays.cell,
                arrays.pbc,
                self._closest(item),
                relax_cell,
                self.min_distance,
            )
        elif isinstance(verdict, Exception):
            raise verdict
        sanity, signal = verdict
        use_prediction = sanity.ok or (options.on_insane == "warn" and "NaN" not in " ".join(sanity.problems))
        # The message names the structure, which may mean building its formula (~30 µs): only
        # when it is raised or logged.
        if not sanity.ok and (options.on_insane == "raise" or logger.isEnabledFor(logging.WARNING)):
            message = f"{item.name}: prediction failed sanity checks: {'; '.join(sanity.problems)}"
            if options.on_insane == "raise":
                raise PredictionError(message)
            logger.warning("%s%s", message, "" if use_prediction else "; keeping the input geometry")

        atoms = item.atoms
        clear_provenance(atoms)
        symmetry, spacegroup_input = None, None
        if options.fix_symmetry:
            from ase.constraints import FixSymmetry

            spacegroup_input = spacegroup_number(atoms, options.symprec)
            symmetry = FixSymmetry(atoms, symprec=options.symprec)
            atoms.set_constraint(list(atoms.constraints) + [symmetry])
        if item.vacuum is not None:
            self._warn_vacuum(item)
        frames = None
        try:
            if use_prediction:
                apply_prediction(atoms, positions, cell, relax_cell)
            if options.return_trajectory:
                frames = self._frames(item, prediction, options, symmetry)
            if options.refine is not None:
                self._refine(item, atoms, options, relax_cell)
        finally:
            if symmetry is not None:
                atoms.set_constraint([c for c in atoms.constraints if c is not symmetry])

        info = atoms.info
        info.update(options.provenance)
        if relax_cell != options.relax_cell:
            info[INFO_RELAX_CELL] = relax_cell  # an allowed cluster kept its box
        info[INFO_MAX_DISPLACEMENT] = signal.max_displacement
        info[INFO_MAX_STRAIN] = signal.max_strain
        info[INFO_SANE] = bool(sanity.ok)
        info[INFO_PROBLEMS] = "; ".join(sanity.problems)
        info[INFO_CORRECTION_RATIO] = signal.correction_ratio
        info[INFO_LAST_CORRECTION] = signal.last_correction
        info[INFO_REFINE_ADVISED] = bool(signal.refine_advised or not sanity.ok)
        if item.vacuum is not None:
            info[INFO_VACUUM_AXES] = ",".join("abc"[axis] for axis in item.vacuum.axes)
            if item.vacuum.cluster:
                info[INFO_CLUSTER] = True
        if self.precision != "float32":
            info[INFO_PRECISION] = self.precision
        if options.fix_symmetry:
            info[INFO_SPACEGROUP_INPUT] = spacegroup_input
            info[INFO_SPACEGROUP] = spacegroup_number(atoms, options.symprec)
            if info[INFO_SPACEGROUP] != spacegroup_input:
                logger.warning("%s: space group changed from %d to %d despite fix_symmetry", item.name, spacegroup_input, info[INFO_SPACEGROUP])
        result = atoms if item.kind == "ase" else from_atoms(atoms, item.kind)
        return (result, frames) if options.return_trajectory else result

    def _warn_vacuum(self, item: _Item) -> None:
        if item.vacuum.cluster:
            logger.warning(
                "%s: an isolated cluster in a periodic box (vacuum of %s): relaxed keeping its box (allow_cluster); the network was trained on crystals",
                item.name,
                item.vacuum.describe(),
            )
        else:
            axes = ", ".join(map(str, item.vacuum.axes))
            logger.warning(
                "%s: vacuum of %s: the lattice vector of periodic axis %s is kept as given (relaxed as a non-periodic axis)",
                item.name,
                item.vacuum.describe(),
                axes,
            )

    def _refine(self, item: _Item, atoms, options: _Options, relax_cell: bool) -> None:
        """Continue from the prediction with real forces (``e3relax_ase.relax.refine``)."""
        from e3relax_ase.relax.refine import refine as refine_structure  # ase.optimize imports scipy: only when refining

        kwargs = dict(options.refine_kwargs)
        if _per_structure(kwargs.get("trajectory")):
            kwargs["trajectory"] = trajectory_path(kwargs["trajectory"], item.index, item.name)
        if item.vacuum is not None and not item.vacuum.cluster and relax_cell and kwargs.get("mask") is None:
            try:  # the vacuum axes found stay frozen under the cell filter too
                kwargs["mask"] = vacuum_cell_mask(atoms.cell.array, item.vacuum.pbc)
            except ValueError as exc:
                logger.warning("%s: %s; refining positions only", item.name, exc)
                relax_cell = False
        refine_structure(atoms, options.refine, relax_cell=relax_cell, **kwargs)

    def _provenance(self, relax_cell: bool) -> dict:
        """The provenance keys that are the same for every structure of a call, in the order
        ``_finish`` writes them (built once a call, not once a structure)."""
        return {
            INFO_MODEL: self.info.name or os.path.basename(self.info.path),
            INFO_SHA256: self.info.sha256,
            INFO_VERSION: __version__,
            INFO_UNTRAINED: bool(self.info.untrained),
            INFO_RELAX_CELL: bool(relax_cell),
        }

    def _frames(self, item: _Item, prediction: Prediction, options: _Options, symmetry) -> list:
        """The input, then every layer's structure, applied through the same constraints."""
        frames = [copy_atoms(item.pristine)]
        for layer in range(prediction.positions.shape[0]):
            frame = copy_atoms(item.pristine)
            if symmetry is not None:
                frame.set_constraint(list(frame.constraints) + [symmetry])
            positions = prediction.positions[layer]
            if item.vacuum is not None and not item.vacuum.cluster:
                positions = positions - item.vacuum.translation
            apply_prediction(frame, positions, prediction.cell[layer], options.relax_cell and not item.keeps_cell)
            if symmetry is not None:
                frame.set_constraint([c for c in frame.constraints if c is not symmetry])
            frame.info["e3relax_layer"] = layer + 1
            frames.append(frame)
        return [from_atoms(f, item.kind) for f in frames]


class _Results(dict):
    """The results of ``relax_many``, telling a progress bar how many arrive."""

    def __init__(self, advance):
        super().__init__()
        self._advance = advance

    def __setitem__(self, key, value):
        new = key not in self
        super().__setitem__(key, value)
        if new:
            self._advance(1)

    def update(self, other):
        new = sum(1 for key in other if key not in self)
        super().update(other)
        if new:
            self._advance(new)


def _progress_bar(progress, structures) -> tuple:
    """(the bar to update or None, whether this call made it and closes it)."""
    if progress is None or progress is False:
        return None, False
    if hasattr(progress, "update"):
        return progress, False
    import sys

    from tqdm.auto import tqdm

    total = len(structures) if hasattr(structures, "__len__") else None
    return tqdm(total=total, desc="relaxing", unit="structure", file=sys.stderr, dynamic_ncols=True, mininterval=0.5), True


def _per_structure(trajectory) -> bool:
    """A trajectory path with a placeholder for each structure ("{index}" or "{name}")."""
    return isinstance(trajectory, (str, os.PathLike)) and ("{index}" in str(trajectory) or "{name}" in str(trajectory))


def trajectory_path(pattern, index: int, name: str) -> str:
    """The refinement trajectory file of one structure: ``pattern`` with "{index}" (its index
    in the call) and "{name}" (its name, made safe for a file name) replaced."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in str(name))
    return str(pattern).format(index=index, name=safe)


def _freeze_garbage_collection() -> bool:
    """Have the garbage collector skip every object that exists now, until ``gc.unfreeze()``.

    Why: the caller's structures (thousands of Atoms) and the model are long-lived, yet each
    full collection during a long ``relax_many`` walks them all; on a first call with 2,000
    small crystals that cost ~85 µs a structure of main-process CPU, against ~52 µs frozen
    (benchmarks/README.md). Freezing changes no result: objects that become garbage are still
    freed by reference counting, and cycles among the frozen ones are collected after the
    call. Not done when the collector is off, or when the program froze objects itself (our
    ``unfreeze`` would undo its freeze).
    """
    if not gc.isenabled() or gc.get_freeze_count() > 0:
        return False
    gc.freeze()
    return True


def _given_name(names, structure, index: int) -> str:
    """The caller's name for input ``index``, else one made from the structure."""
    return names[index] if names is not None else _name_of(structure, index)


def _input_atoms(structure, inplace: bool) -> tuple:
    """(ASE Atoms, "ase" | "pymatgen") of an input; ``inplace`` is for ASE input only."""
    atoms, kind = as_atoms(structure)
    if inplace and kind != "ase":
        raise ValueError("inplace=True works on ASE Atoms only; pymatgen input always returns a new Structure")
    return atoms, kind


def _work_copies(atoms, kind: str, inplace: bool, keep_pristine: bool) -> tuple:
    """(the Atoms that receives the prediction, an untouched copy for trajectories or None).

    The caller's ASE Atoms is written only with ``inplace``; a pymatgen input was converted,
    so its Atoms is already ours.
    """
    pristine = copy_atoms(atoms) if keep_pristine else None
    work = atoms if (inplace or kind != "ase") else copy_atoms(atoms)
    return work, pristine


def _name_of(structure, index: int | None) -> str:
    try:
        atoms, _ = as_atoms(structure)
    except Exception:
        return "structure" if index is None else f"structure {index}"
    return structure_name(atoms, index)
