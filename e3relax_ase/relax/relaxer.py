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
from collections.abc import Iterable, Sized
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch

from e3relax_ase.geometry.validation import StructureReport, structure_name
from e3relax_ase.io.checkpoint import CheckpointInfo, load_checkpoint
from e3relax_ase.io.structures import as_atoms
from e3relax_ase.keys import ISOLATION_MARGIN, MIN_DISTANCE
from e3relax_ase.nn.architectures import Network
from e3relax_ase.nn.compiled import CompiledForward
from e3relax_ase.nn.graphed import GraphedForward
from e3relax_ase.nn.model import E3RelaxH2
from e3relax_ase.nn.precision import check_precision
from e3relax_ase.relax.device import CUDA_BATCH_STRUCTURES, default_edge_budget, resolve_device, resolve_dtype
from e3relax_ase.relax.finish import Finisher, per_structure
from e3relax_ase.relax.heap import keep_freed_heap
from e3relax_ase.relax.items import BatchBudget, PredictionError, RefineOptions, RelaxFailure, RelaxOptions, name_of
from e3relax_ase.relax.pipeline import ChunkPipeline, Results, freeze_garbage_collection, progress_bar
from e3relax_ase.relax.pool import pool_is_broken, start_worker_pool
from e3relax_ase.relax.prefetch import PREFETCH_ITEMS, prefetched
from e3relax_ase.relax.preparation import PreparationSettings
from e3relax_ase.relax.prepare import pooled, prepare_atoms, prepared
from e3relax_ase.relax.runner import NetworkRunner
from e3relax_ase.relax.threads import torch_threads

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["BatchBudget", "OneShotRelaxer", "PredictionError", "RefineOptions", "RelaxFailure", "grouped_options"]

logger = logging.getLogger(__name__)


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

    # (num_workers, the pool, its finalizer): set by _worker_pool, absent until then
    _workers: tuple[int, ProcessPoolExecutor, weakref.finalize] | None

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
                The first batch waits for the compilation, later ones run faster (how much
                depends on the model's size and the precision: benchmarks/README.md). For long
                runs; outputs agree with the eager pass to rounding. Needs Triton on CUDA, a C++ compiler on a CPU.

        Raises:
            CheckpointError: the checkpoint cannot be loaded.
            ValueError: an unavailable device or unsupported dtype.
        """
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.precision = check_precision(precision, self.dtype)
        model: Network
        if isinstance(checkpoint, E3RelaxH2):
            model, info = checkpoint, _model_info(checkpoint, "in-memory")
        else:
            model, info = load_checkpoint(checkpoint, map_location="cpu")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cpu":
            keep_freed_heap()  # no page faults on every forward pass (e3relax_ase.relax.heap)
        self.info = info
        self.batch_size = batch_size if batch_size is not None else (1 if self.device.type == "cpu" else CUDA_BATCH_STRUCTURES)
        self.max_atoms = max_atoms
        self.max_edges = max_edges or default_edge_budget(self.device, self.dtype, self.model.config.num_channels)
        self.min_distance = min_distance
        self.reduce_cell = reduce_cell
        self.runner = NetworkRunner(
            self.model,
            self.device,
            self.dtype,
            reduce_cell,
            self.precision,
            self.max_edges,
            graphed=GraphedForward(self.model) if cuda_graphs and self.device.type == "cuda" else None,
            compiled=CompiledForward(self.model) if compile else None,
        )
        self.finisher = Finisher(info, self.precision, min_distance, self.model.config.cutoff)
        if info.untrained:
            logger.warning("checkpoint %r is UNTRAINED (random weights): its predictions are meaningless", info.name)

    def __repr__(self) -> str:
        extra = "" if self.precision == "float32" else f", precision={self.precision!r}"
        extra += ", compile=True" if self.runner.compiled is not None else ""
        return f"OneShotRelaxer(checkpoint={self.info.name!r}, device={str(self.device)!r}, dtype={self.dtype}{extra})"

    # --- validation ------------------------------------------------------------------------
    def validate(self, structure, name: str | None = None, allow_cluster: bool = False) -> StructureReport:
        """Check a structure as ``relax`` would, without running the network.

        Raises:
            InvalidStructureError: naming the structure and the problem.
        """
        atoms, _ = as_atoms(structure)
        return prepare_atoms(atoms, name or structure_name(atoms), self.preparation_settings(allow_cluster))[0].report

    def preparation_settings(self, allow_cluster: bool = False) -> PreparationSettings:
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
        return self.relax_many([structure], names=[options.pop("name", None) or name_of(structure, None)], **options)[0]

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
        refine=None,
        budget: BatchBudget | None = None,
        prefetch: bool = False,
        num_workers: int = 0,
        allow_cluster: bool = False,
        progress=False,
        **keywords,
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
            refine: continue from the prediction with real forces: a ``RefineOptions`` (the
                calculator, fmax, steps, optimizer, cell filter, pressure, mask, trajectory,
                logfile), or just the calculator (an ASE calculator, factory or name) with the
                defaults, as in :func:`e3relax_ase.relax.refine.refine`.
            budget: this call's ``BatchBudget`` per forward pass (default: the relaxer's).
            **keywords: the former keywords, still accepted: ``batch_size``, ``max_atoms``,
                ``max_edges`` (a ``BatchBudget``'s fields) and ``fmax``, ``steps``,
                ``optimizer``, ``cell_filter``, ``scalar_pressure``, ``mask``,
                ``trajectory``, ``logfile`` (a ``RefineOptions``'s fields); given with
                ``budget`` or a ``RefineOptions``, they override its fields.
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
        refine, budget = grouped_options(refine, budget, keywords)
        options = RelaxOptions(relax_cell, fix_symmetry, symprec, return_trajectory, on_insane, refine)
        options.provenance = self.finisher.provenance(relax_cell)
        options.settings = self.preparation_settings(allow_cluster)
        limits = (
            budget.batch_size if budget.batch_size is not None else self.batch_size,
            budget.max_atoms if budget.max_atoms is not None else self.max_atoms,
            min(budget.max_edges, self.runner.batch_edges) if budget.max_edges is not None else self.runner.batch_edges,
        )
        bar, own_bar = progress_bar(progress, structures)
        results: dict[int, Any] = Results(bar.update) if bar is not None else {}
        keep_pristine = bool(return_trajectory)
        if num_workers and num_workers > 0:
            options.pool = self._worker_pool(int(num_workers))
            source = pooled(structures, names, inplace, keep_pristine, errors, options, int(num_workers))
        else:
            source = prepared(structures, names, inplace, keep_pristine, errors, options.settings)
            if prefetch and not (isinstance(structures, Sized) and len(structures) <= 1):
                source = prefetched(source, PREFETCH_ITEMS)
        frozen = freeze_garbage_collection()
        host_threads: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if options.pool is not None and self.device.type == "cuda" and options.refine is None:
            host_threads = torch_threads(1)  # the workers need the cores (e3relax_ase.relax.threads)
        try:
            with host_threads:
                ChunkPipeline(self.runner, self.finisher).run(source, limits, options, errors, results)
        finally:
            if frozen:
                gc.unfreeze()
            source.close()
            if options.pool is not None and pool_is_broken(options.pool):
                self.close()  # a worker died: start afresh next time
            if own_bar:
                bar.close()
        trajectory = refine.trajectory if refine is not None else None
        if isinstance(trajectory, (str, os.PathLike)) and not per_structure(trajectory) and len(results) > 1:
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

    def _worker_pool(self, num_workers: int):
        """The worker processes, started on first use and kept while ``num_workers`` is the same."""
        workers = getattr(self, "_workers", None)
        if workers is not None and workers[0] == num_workers and not pool_is_broken(workers[1]):
            return workers[1]
        self.close()
        pool = start_worker_pool(num_workers)
        self._workers = (num_workers, pool, weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True))
        return pool


_BUDGET_KEYWORDS = tuple(f.name for f in fields(BatchBudget))
_REFINE_KEYWORDS = tuple(f.name for f in fields(RefineOptions) if f.name != "calculator")


def grouped_options(refine, budget: BatchBudget | None, keywords: dict) -> tuple:
    """(RefineOptions or None, BatchBudget) from ``relax_many``'s grouped arguments and the
    former flat keywords (which override the grouped fields they name).

    Raises:
        TypeError: a keyword that is neither.
    """
    unknown = sorted(set(keywords) - set(_BUDGET_KEYWORDS) - set(_REFINE_KEYWORDS))
    if unknown:
        raise TypeError(f"relax_many() got an unexpected keyword argument {unknown[0]!r}")
    budget = replace(budget or BatchBudget(), **{k: keywords[k] for k in _BUDGET_KEYWORDS if k in keywords})
    if refine is None:
        return None, budget  # refinement keywords without a calculator do nothing, as before
    if not isinstance(refine, RefineOptions):
        refine = RefineOptions(refine)
    return replace(refine, **{k: keywords[k] for k in _REFINE_KEYWORDS if k in keywords}), budget
