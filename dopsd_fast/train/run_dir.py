"""One run per output_dir, and logs that a resume cuts back to the step it continues from.

``lock_output_dir``: a run holds ``<output_dir>/.lock`` (``flock``) for as long as it trains. Without it a second run
into the same folder removed the first one's ``step-N.tmp`` mid-write (the first crashed) and interleaved its rows
into ``metrics.jsonl``. The OS drops the lock when its process ends, however it ends, so a lock left by a dead
run never blocks the next one; the file keeps the holder's host and pid for the refusal message.

``drop_rows_after``: rows are logged before their step's checkpoint, so a run that dies between checkpoints
has logged steps its resume trains again. Dropping them at resume makes the log equal an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

from .distributed import any_over_ranks

LOCK_NAME = ".lock"


class OutputDirBusy(RuntimeError):
    """Another live run trains into this output_dir; the message names it and the fix."""


@contextlib.contextmanager
def lock_output_dir(out: Path, holder: bool = True):
    """Hold ``out``'s lock inside the block, or raise OutputDirBusy having written nothing. ``holder``: whether
    this process takes the lock (DeepSpeed: rank 0, for the ranks of one run share the folder); every rank raises
    if it is refused (a collective, so every rank must enter)."""
    fd, busy = _acquire(out) if holder else (None, None)
    if any_over_ranks(busy is not None):            # only the holder can be refused, and then holds nothing
        raise busy or OutputDirBusy(f"{out}: rank 0 found another run training into this folder (its message says "
                                    "which); give this run its own --set train.output_dir=NEW_DIR")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)        # releases the lock


def _acquire(out: Path) -> tuple[int | None, OutputDirBusy | None]:
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)     # no O_TRUNC: a refused run must leave the holder's name
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a run that is starting"
        os.close(fd)
        return None, OutputDirBusy(f"{out}: another run is training into this folder ({holder}, holding {path}); "
                                   "wait for it to end or stop it, or give this run its own --set "
                                   "train.output_dir=NEW_DIR")
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
    return fd, None


def drop_rows_after(step: int, *logs: Path) -> None:
    """Remove the rows of JSONL ``logs`` whose ``step`` is past ``step`` (files that do not exist are skipped).
    A line without its newline was cut short by a kill mid-write and goes too: every row is written whole with one."""
    for path in logs:
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
        if kept != lines:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)       # a kill here leaves the old log whole, never a half-written one


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")             # not a row: dropped
