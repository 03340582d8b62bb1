"""``relax_many(prefetch=True)``: the relaxer's own preparation run in a background thread
(``prefetched``), ahead of the network."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator

PREFETCH_ITEMS = 4096  # most structures prepared ahead of the network by the background thread


def prefetched(source: Iterator, depth: int) -> Generator:
    """Run ``source`` in a background thread, up to ``depth`` entries ahead of the consumer.

    Entries come out in order; an exception in ``source`` is raised at its place. Closing the
    returned generator stops the thread after the entry it is working on.
    """
    entries: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                entries.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for entry in source:
                if not put((True, entry)):
                    return
            put((False, None))
        except BaseException as exc:  # raised in the consumer, in order
            put((False, exc))

    thread = threading.Thread(target=work, name="e3relax-prepare", daemon=True)
    thread.start()
    try:
        while True:
            ok, entry = entries.get()
            if ok:
                yield entry
            elif entry is None:
                return
            else:
                raise entry
    finally:
        stop.set()
        thread.join(timeout=5.0)
