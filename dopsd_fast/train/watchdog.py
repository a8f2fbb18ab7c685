"""A deadline on the collective phases of a multi-rank run: a hung or dead peer ends every rank.

gloo does not honour the process group's timeout inside a ring all-reduce: a peer that is stopped (SIGSTOP, a
hung driver, a swapped-out node) keeps its sockets open and sends nothing, and the other ranks wait in
``c10d::Work::wait`` forever. A peer that dies outright closes its sockets, and a collective usually fails at once,
but nothing promises the exception path then reaches the end of the process (the teardown barrier waits too).

So a multi-rank run arms a deadline of ``deepspeed.timeout_s`` around each phase that holds a collective (one step's
forward/backward, its optimizer step, the per-step stop agreement, a checkpoint's barriers, the final teardown);
a daemon thread watches it. A phase past its deadline prints which rank and phase it was stuck in and ends the
process with ``os._exit(EXIT_HUNG)``: no Python cleanup, which would wait on the same peer. Startup is not covered
(the process group's own init timeout bounds the rendezvous), nor is work outside those phases (sampling, logging).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

# sysexits.h EX_PROTOCOL ("remote error in protocol"): a peer rank stopped answering. Distinct from 0 (done),
# 1 (a crash), 2 (bad input), 3 (diverged, finite.py), 75 (stopped on a signal, stop.py).
EXIT_HUNG = 76


class Watchdog:
    """Ends the process if a phase armed by ``guard`` runs past ``timeout_s``. Phases nest; the outermost counts."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float = 0.5):
        self.timeout_s, self.rank, self.poll_s = timeout_s, rank, poll_s
        self._phase: str | None = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="dopsd-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, phase: str):
        with self._lock:
            outer = self._phase is None
            if outer:
                self._phase, self._since = phase, time.monotonic()
        try:
            yield
        finally:
            if outer:
                with self._lock:
                    self._phase = None

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                phase, waited = self._phase, time.monotonic() - self._since
            if phase is not None and waited > self.timeout_s:
                os.write(2, (f"\ndopsd: error: rank {self.rank}: no progress for {waited:.0f} s in {phase} "
                             f"(deepspeed.timeout_s={self.timeout_s:g}): a peer rank died or hangs; exiting "
                             f"{EXIT_HUNG}\n").encode())
                os._exit(EXIT_HUNG)


_active: Watchdog | None = None


def install(timeout_s: float, rank: int) -> Watchdog:
    """Start this process's watchdog (once; a multi-rank run only)."""
    global _active
    if _active is None:
        _active = Watchdog(timeout_s, rank)
    return _active


def guard(phase: str):
    """A deadline of ``timeout_s`` on the block when a watchdog is installed; else nothing."""
    return _active.guard(phase) if _active is not None else contextlib.nullcontext()
