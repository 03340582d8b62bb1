"""The chunk scheduler of ``relax_many``: prepared items grouped into forward passes within a
budget, each pass launched before the one ahead of it is completed, predictions judged (in
the worker processes when there are some) and finished in input order, failures isolated to
the structure that caused them."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from e3relax_ase.relax.finish import Finisher
from e3relax_ase.relax.items import Item, RelaxFailure, RelaxOptions
from e3relax_ase.relax.pool_judge import collect_verdicts, judge_here, submit_judging
from e3relax_ase.relax.predict import Prediction
from e3relax_ase.relax.runner import NetworkRunner

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
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


class ChunkPipeline:
    """Runs the prepared items of one call through ``runner`` and ``finisher`` (module docstring)."""

    def __init__(self, runner: NetworkRunner, finisher: Finisher):
        self.runner, self.finisher = runner, finisher

    def run(self, source: Iterator, budget: tuple, options: RelaxOptions, errors: str, results: dict) -> None:
        """Group the prepared items of ``source`` into forward passes within ``budget`` and put
        each structure's result in ``results``.

        A chunk's forward pass is launched as soon as the chunk is full, queued behind the one
        still running, and only then is that earlier one completed: the GPU goes from one pass
        to the next while this process maps the earlier predictions back, finishes the chunk
        before it and reads on. With workers, a completed chunk's predictions are judged there
        meanwhile; it is finished at the next chunk boundary (``Chunk``, ``advance``). On
        CUDA the freed memory of a queued pass is reused by the next in stream order, so two
        passes in flight need no more memory than one.
        """
        pending: list[Item] = []
        pending_atoms = pending_edges = 0  # running totals: the budget check stays O(1) per structure
        launched: Chunk | None = None
        being_judged: Chunk | None = None
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
            if pending and not self.fits(len(pending) + 1, pending_atoms + n_atoms, pending_edges + n_edges, *budget):
                to_complete, earlier = launched, being_judged
                launched = self.launch(pending)
                being_judged = self.advance(to_complete, earlier, options, errors, results)
                pending, pending_atoms, pending_edges = [], 0, 0
            pending.append(item)
            pending_atoms += n_atoms
            pending_edges += n_edges
        if pending:
            to_complete, earlier = launched, being_judged
            launched = self.launch(pending)
            being_judged = self.advance(to_complete, earlier, options, errors, results)
        being_judged = self.advance(launched, being_judged, options, errors, results)
        if being_judged is not None:
            results.update(self.end_chunk(being_judged, options, errors))
        if source_error is not None:
            raise source_error

    def fits(self, n_structures: int, n_atoms: int, n_edges: int, batch_size, max_atoms, max_edges) -> bool:
        """Whether one forward pass may take this many structures, atoms and edges."""
        if batch_size is not None and n_structures > batch_size:
            return False
        if max_atoms is not None and n_atoms > max_atoms:
            return False
        return n_edges <= min(max_edges, self.runner.batch_edges)

    def advance(self, launched: Chunk | None, earlier: Chunk | None, options: RelaxOptions, errors: str, results: dict) -> Chunk | None:
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
            chunk = self.complete(launched, options, errors)
        finally:
            if earlier is not None:
                results.update(self.end_chunk(earlier, options, errors))
        if chunk.judging is not None:
            return chunk
        results.update(self.end_chunk(chunk, options, errors))
        return None

    def run_chunk(self, items: list[Item], options: RelaxOptions, errors: str) -> dict:
        """Predict, judge and finish ``items`` (one forward pass): {index: result}."""
        return self.end_chunk(self.complete(self.launch(items), options, errors), options, errors)

    def launch(self, items: list[Item]) -> Chunk:
        """Queue the forward pass of ``items`` (on CUDA it runs while this process reads on).

        Never raises: a failure is kept in the chunk, and ``complete`` raises or handles it in
        its turn, after the chunks before it.
        """
        try:
            return Chunk(items, pending=self.runner.predict(items))
        except Exception as exc:
            return Chunk(items, error=exc)

    def complete(self, chunk: Chunk, options: RelaxOptions, errors: str) -> Chunk:
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
                return Chunk(items, done={items[0].index: RelaxFailure(items[0].index, items[0].name, exc)})
            # Isolate the structure that broke the batch: every other one still gets its result.
            logger.warning("a batch of %d structures failed (%s); retrying them one at a time", len(items), exc)
            out = {}
            for item in items:
                out.update(self.run_chunk([item], options, errors))
            return Chunk(items, done=out)
        chunk = Chunk(items, predictions=predictions)
        if options.pool is not None:
            try:
                chunk.judging = self.submit_judging(items, predictions, options)
            except Exception as exc:  # e.g. a worker died: judge here instead, the same way
                logger.warning("judging predictions in worker processes failed (%s); judging them here", exc)
        return chunk

    def end_chunk(self, chunk: Chunk, options: RelaxOptions, errors: str) -> dict:
        """Finish a started chunk: apply each judged prediction to its Atoms. {index: result}."""
        if chunk.done is not None:
            return chunk.done
        predictions = chunk.predictions
        assert predictions is not None  # complete() gives a chunk either its results or its predictions
        judged = None
        if chunk.judging is not None:
            try:
                judged = collect_verdicts(chunk.judging)
            except Exception as exc:
                logger.warning("judging predictions in worker processes failed (%s); judging them here", exc)
        if judged is None:
            judged = self.judge_here(chunk.items, predictions, options)
        out = {}
        for item, prediction, verdict in zip(chunk.items, predictions, judged):
            try:
                out[item.index] = self.finisher.finish(item, prediction, options, verdict)
            except Exception as exc:
                if errors == "raise":
                    raise
                out[item.index] = RelaxFailure(item.index, item.name, exc)
        return out

    def submit_judging(self, items: list[Item], predictions: list[Prediction], options: RelaxOptions) -> list:
        """Send the judging of every item to the worker processes; the tasks."""
        return submit_judging(options.pool, predictions, *self.judged_inputs(items), options.relax_cell, self.finisher.min_distance)

    def judge_here(self, items: list[Item], predictions: list[Prediction], options: RelaxOptions) -> list:
        """The verdicts of ``submit_judging``, computed in this process (the same function).
        Should packing the batch fail, each item is judged alone in ``finish``."""
        try:
            return judge_here(predictions, *self.judged_inputs(items), options.relax_cell, self.finisher.min_distance)
        except Exception:  # noqa: BLE001 (e.g. a prediction of the wrong shape: that item fails alone)
            return [None] * len(items)

    def judged_inputs(self, items: list[Item]) -> tuple[list, list]:
        """What judging needs of each item: its input arrays, and a lower bound on its pair distances."""
        return [item.arrays for item in items], [self.finisher.closest(item) for item in items]


class Results(dict):
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


def progress_bar(progress, structures) -> tuple:
    """(the bar to update or None, whether this call made it and closes it)."""
    if progress is None or progress is False:
        return None, False
    if hasattr(progress, "update"):
        return progress, False
    import sys

    from tqdm.auto import tqdm

    total = len(structures) if hasattr(structures, "__len__") else None
    return tqdm(total=total, desc="relaxing", unit="structure", file=sys.stderr, dynamic_ncols=True, mininterval=0.5), True


def freeze_garbage_collection() -> bool:
    """Have the garbage collector skip every object that exists now, until ``gc.unfreeze()``.

    Why: the caller's structures (thousands of Atoms) and the model are long-lived, yet each
    full collection during a long ``relax_many`` walks them all, a large share of the main
    process's CPU per small crystal (``bench_pipeline.py`` in benchmarks/README.md). Freezing
    changes no result: objects that become garbage are still freed by reference counting, and
    cycles among the frozen ones are collected after the call. Not done when the collector is
    off, or when the program froze objects itself (our ``unfreeze`` would undo its freeze).
    """
    if not gc.isenabled() or gc.get_freeze_count() > 0:
        return False
    gc.freeze()
    return True
