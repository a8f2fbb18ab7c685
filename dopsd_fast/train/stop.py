"""Stopping on a signal: the step under way finishes, a checkpoint is written, the process exits EXIT_STOPPED.

SIGTERM (``kill``, schedulers, torchrun passing its own on), SIGINT (Ctrl-C), SIGHUP (the terminal went away) and
SIGUSR1 (e.g. SLURM's ``--signal=USR1@120`` warning before a time limit) only set a flag while ``Trainer.train``
runs; the loop reads it once per step, after the step's row and any scheduled checkpoint. Without this a signal
lost every step since the last checkpoint, and SIGINT raised KeyboardInterrupt wherever Python happened to be
(a traceback from inside TensorBoard's writer).

Under DeepSpeed the save is collective, so the ranks agree before stopping: one all-reduce (max) of the flag per
step, and a signal to any one rank stops all of them at the same step. torchrun passes a SIGTERM, SIGINT or SIGHUP of
its own on to every rank and SIGKILLs them ``--shutdown_timeout`` (30) seconds later: raise it above a step plus a save.

A second signal while stopping is reported and ignored, so it cannot cut the checkpoint short; SIGKILL still
stops at once and loses nothing but the steps since the last checkpoint (a save is a ``step-N.tmp`` folder
renamed when complete, see checkpoint.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from .distributed import any_over_ranks

# sysexits.h EX_TEMPFAIL ("try again later"): distinct from 0 (done), 1 (a crash), 2 (bad input) and from the
# 128 + N a shell reports for a process the signal killed before it could save; rerunning resumes.
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, reason: str, step: int, checkpoint: Path):
        super().__init__(f"stopped by {reason} at step {step}; checkpoint: {checkpoint}; rerun the same command to "
                         "resume (train.resume=auto)")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class StopRequest:
    """The first of SIGNALS received while ``installed``; the trainer asks ``agreed()`` once per step."""

    def __init__(self):
        self.signal: signal.Signals | None = None

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGNALS inside the block, then restore the previous handlers. Python runs signal handlers in the
        main thread only, so a trainer driven from another thread keeps the default behaviour."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signal.Signals(signum)
            note = f"stopping after this step and its checkpoint (exit {EXIT_STOPPED})"
        else:
            note = f"ignored: already stopping after {self.signal.name} (SIGKILL stops at once)"
        # os.write, not print: a handler can run in the middle of a print, and a nested one raises "reentrant call"
        os.write(2, f"\ndopsd: {name}: {note}\n".encode())

    def agreed(self) -> bool:
        """Whether any rank received a signal (every rank must call it at the same point of the step)."""
        return any_over_ranks(self.signal is not None)

    @property
    def reason(self) -> str:
        return self.signal.name if self.signal is not None else "a signal to another rank"
