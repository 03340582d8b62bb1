"""Claiming an output file for one run, so that two runs never write the same file.

A run claims each output before it relaxes anything for it, by creating a lock file beside it
(``.NAME.e3relax-lock``) with ``O_CREAT | O_EXCL``: of two runs that want the same output, the
second finds the lock and refuses that output at once instead of relaxing for an hour and then
overwriting the first one's result (or being refused at the end). The lock holds the owner's
host, process id and run id; it is removed when the output is written or the run ends.

A lock left by a run that was killed (SIGKILL, power loss) names a process that no longer
exists on this host: it is taken over, with a warning. A lock from another host cannot be
checked and is never taken over: the message names the file to delete. The processes of one
torchrun job share rank 0's run id, so its ranks recognise the lock their rank 0 made.

While a run holds the lock, temporary files beside the output (``.NAME.*.tmp*``) and parts
folders being deleted can only be leftovers of a killed run: they are removed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".e3relax-lock"


class OutputClaimedError(RuntimeError):
    """Another run holds the output; the message says which and how to clear a stale lock."""


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def new_run_id() -> str:
    """An id for one run: host, pid and a random token (two runs in one Python process are two
    runs). The ranks of a torchrun job share rank 0's (the CLI broadcasts it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class OutputClaim:
    """An output this run holds; ``release()`` gives it up (removes the lock)."""

    output: Path
    lock: Path
    owned: bool  # False for a torchrun rank other than the one that created the lock

    def release(self) -> None:
        if self.owned:
            try:
                self.lock.unlink()
            except FileNotFoundError:
                pass
            self.owned = False


def claim(output: Path, run: str, create: bool = True) -> OutputClaim:
    """Claim ``output`` for this run.

    Args:
        output: the output file.
        run: this run's id (``new_run_id``).
        create: False only checks that no other run holds it (the ranks of a torchrun job
            other than rank 0, which creates the lock).

    Raises:
        OutputClaimedError: another live run holds it, or its lock cannot be judged.
    """
    output = Path(output)
    lock = lock_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    me = {"run": run, "host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):  # a lock that vanishes or turns out stale between two looks: look again
        if not create:
            holder = _read(lock)
            if holder is None or holder.get("run") == me["run"]:
                return OutputClaim(output, lock, owned=False)
            _refuse_unless_stale(output, lock, holder)
            continue
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is not None and holder.get("run") == me["run"]:
                return OutputClaim(output, lock, owned=False)  # this run's own (another rank's)
            _refuse_unless_stale(output, lock, holder)
            continue
        with os.fdopen(descriptor, "w") as stream:
            json.dump(me, stream)
        _remove_stale_temporaries(output)
        return OutputClaim(output, lock, owned=True)
    raise OutputClaimedError(f"{output}: could not lock it ({lock} keeps changing)")


def _read(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: judged as foreign


def _refuse_unless_stale(output: Path, lock: Path, holder: dict | None) -> None:
    """Return when the lock is gone or was stale (and is removed); raise when it is live."""
    if holder is None:
        return
    host, pid = holder.get("host"), holder.get("pid")
    # Not alive, or this very process (a run before this one in the same Python process that
    # stopped without releasing): stale.
    if host == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
        logger.warning("%s: taking over the lock of run %s, which is no longer running", output, holder.get("run"))
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        return
    who = f"process {pid} on {host}" if host else "an unknown process"
    raise OutputClaimedError(f"{output} is being written by another e3relax-ase run ({who}); if no such run is going on, delete {lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of an interrupted write, and parts folders an interrupted run was deleting
    (``streamed.StreamedOutput.discard``)."""
    name = glob.escape(output.name)
    for leftover in [*output.parent.glob(f".{name}.*.tmp*"), *output.parent.glob(f".{name}.e3relax-parts.*-*")]:
        try:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            logger.info("%s: removed %s, left by an interrupted run", output, leftover.name)
        except OSError:
            pass
