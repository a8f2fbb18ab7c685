"""Which implementation an op runs: ``triton`` or ``reference`` (pure PyTorch, dopsd_fast/ops/reference.py).

``auto`` (the default) picks Triton for CUDA tensors, and for CPU tensors only under ``TRITON_INTERPRET=1``
(the tests); everything else runs the reference. ``DOPSD_BACKEND=triton|reference`` or :func:`use_backend`
forces one (a forced ``triton`` on CPU tensors without the interpreter fails loudly in the launch).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Literal

import torch

Backend = Literal["auto", "triton", "reference"]
_forced: list[Backend] = []
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> Backend:
    # the innermost non-auto use_backend wins; "auto" (e.g. a config's default) defers to outer blocks and the env
    for name in reversed(_forced):
        if name != "auto":
            return name
    value = os.environ.get("DOPSD_BACKEND", "auto")
    if value not in ("auto", "triton", "reference"):
        raise ValueError(f"DOPSD_BACKEND={value!r}: expected auto, triton or reference")
    return value  # type: ignore[return-value]


def backend_for(*tensors: torch.Tensor) -> Literal["triton", "reference"]:
    want = requested_backend()
    if want != "auto":
        return want
    if not _HAS_TRITON:
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    return "triton" if on_cuda or (interpreting() and not any(t.is_cuda for t in tensors)) else "reference"


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Force a backend inside a block (the config switch and tests use this); ``auto`` defers to outer choices."""
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"backend {name!r}: expected auto, triton or reference")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
