"""What ``e3relax-ase relax`` tells its user: a progress bar while it runs, then a summary.

* progress: a tqdm bar on stderr counting structures (every frame of every input), with the
  rate in structures/s; shown when stderr is a terminal, or when asked (``--progress``);
* stderr, at the end: one line saying what was relaxed, what failed and where it went
  (``-q`` silences it);
* stdout, with ``--json``: the machine-readable record, nothing else.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

MAX_NAMED_OUTPUTS = 3  # outputs named in the closing line; more are counted


class Progress:
    """A tqdm bar over structures whose total grows as inputs are read (an input counts one
    structure until it is opened), or nothing when not shown."""

    def __init__(self, n_inputs: int, show: bool):
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_inputs, desc="relaxing", unit="structure", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def opened(self, n_structures: int) -> None:
        """An input turned out to hold ``n_structures`` (it counted one until now)."""
        if self.bar is not None and n_structures != 1:
            self.bar.total += n_structures - 1
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def logging_through_the_bar(self):
        """Log lines printed above the bar instead of through it."""
        if self.bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def closing_line(summary: dict, elapsed: float, relaxing: float) -> str:
    """One line on what the run did: counts, time (and the rate once the model was loaded),
    and the outputs written."""
    n_ok, n_failed, n_skipped = summary["n_ok"], summary["n_failed"], summary["n_skipped"]
    rate = f", {n_ok / relaxing:.1f} structures/s" if n_ok and relaxing > 0 else ""
    parts = [f"relaxed {n_ok} structure{'s' * (n_ok != 1)} in {elapsed:.1f} s{rate}"]
    if n_failed:
        parts.append(f"{n_failed} failed")
    if n_skipped:
        parts.append(f"{n_skipped} skipped")
    outputs = list(dict.fromkeys(r["output"] for r in summary["results"] if r["status"] == "ok" and r["output"]))
    if outputs:
        named = ", ".join(outputs[:MAX_NAMED_OUTPUTS])
        more = len(outputs) - MAX_NAMED_OUTPUTS
        if more > 0:
            folders = {str(Path(o).parent) for o in outputs}
            named += f" and {more} more" + (f" in {folders.pop()}" if len(folders) == 1 else "")
        parts.append(f"wrote {named}")
    else:
        parts.append("wrote nothing")
    return "e3relax-ase: " + "; ".join(parts)


def _summary(jobs: list, empty_folders: list, relaxer) -> dict:
    """The --json summary: one entry per structure (or per input that could not be opened)."""
    results = []
    for message in empty_folders:
        folder = message.split(": folder holds", 1)[0]
        results.append({"input": folder, "source": folder, "index": None, "frame": None, "output": None,
                        "status": "failed", "error": message})  # fmt: skip
    for job in jobs:
        results += job.summary_entries()
    count = {status: sum(r["status"] == status for r in results) for status in ("ok", "failed", "skipped")}
    info = relaxer.info
    return {
        "checkpoint": {"name": info.name, "sha256": info.sha256, "untrained": info.untrained},
        "device": str(relaxer.device),
        "n_ok": count["ok"],
        "n_failed": count["failed"],
        "n_skipped": count["skipped"],
        "results": results,
    }
