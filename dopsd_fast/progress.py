"""Progress bars, one look everywhere: training steps, weight loading, validation grids, the demo's evaluation.

A bar shows only where someone watches it: on global rank 0 (the launcher's RANK, read from the environment
because the weights load before the process group exists), with stderr a terminal (a log file or a CI run gets
no bar), and not inside ``quiet()`` (``--no-progress``). It leaves no line behind (leave=False), so what the run
prints with ``tqdm.write`` (the trainer's table) stays readable above it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm

_shown = contextvars.ContextVar("dopsd_progress_shown", default=True)


def progress(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
             unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand, ``total`` steps); quiet unless ``enabled`` and watched."""
    watched = _shown.get() and os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (enabled and watched), leave=False,
                dynamic_ncols=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No bars inside (a command's ``--no-progress``), whichever function opens them."""
    token = _shown.set(False)
    try:
        yield
    finally:
        _shown.reset(token)
