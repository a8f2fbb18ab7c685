"""Which implementation an op runs: ``cpp`` (the csrc/ extension dopsd_fast._C: CUDA kernels, and their C++ CPU
twins), ``triton`` or ``reference`` (pure PyTorch, dopsd_fast/ops/reference.py).

``auto`` (the default): CUDA tensors run the extension's CUDA kernels for the ops it has (``native=True`` callers)
when it was built with CUDA, else Triton, or the reference where a caller measured it faster (``cuda_auto``); CPU tensors run Triton under ``TRITON_INTERPRET=1`` (the tests) and the
reference otherwise. ``DOPSD_BACKEND=cpp|triton|reference`` or :func:`use_backend` forces one; a forced ``cpp``
applies to the ops the extension has, the others keep their ``auto`` choice (a forced ``triton`` on CPU tensors
without the interpreter fails loudly in the launch).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Iterator, Literal

import torch

Backend = Literal["auto", "cpp", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "cpp", "triton", "reference")
_forced: list[Backend] = []
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _load_native() -> str | None:
    """Loads dopsd_fast._C once; returns why it is unavailable (None when loaded). Warns once on failure."""
    spec = importlib.util.find_spec("dopsd_fast._C")
    if spec is None or spec.origin is None:
        why = ("dopsd_fast._C is not built (DOPSD_SKIP_NATIVE=1, or an install from before csrc/ existed): "
               "re-run `pip install -e .` to build it")
    else:
        try:
            torch.ops.load_library(spec.origin)
            return None
        except OSError as err:   # e.g. built against another torch than the one installed now
            why = f"{spec.origin} failed to load ({err}); rebuild it with `pip install -e .` against this torch"
    warnings.warn(f"{why}. The cpp backend is unavailable; ops use Triton / the reference.", stacklevel=3)
    return why


def native_available(cuda: bool = False) -> bool:
    """The extension loaded (and, with ``cuda``, was built with its CUDA kernels)."""
    if _load_native() is not None:
        return False
    return not cuda or torch._C._dispatch_has_kernel_for_dispatch_key("dopsd_C::rollout_step", "CUDA")


def requested_backend() -> Backend:
    # the innermost non-auto use_backend wins; "auto" (e.g. a config's default) defers to outer blocks and the env
    for name in reversed(_forced):
        if name != "auto":
            return name
    value = os.environ.get("DOPSD_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"DOPSD_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value  # type: ignore[return-value]


def backend_for(*tensors: torch.Tensor, native: bool = False,
                cuda_auto: Literal["triton", "reference"] = "triton") -> Literal["cpp", "triton", "reference"]:
    """The backend for an op on these tensors; ``native``: the op has a csrc/ implementation (``dopsd_C::<op>``);
    ``cuda_auto``: what ``auto`` runs on CUDA tensors when no CUDA kernel of csrc/ applies."""
    want = requested_backend()
    if want == "cpp" and native:
        if not native_available(cuda=any(t.is_cuda for t in tensors)):
            raise RuntimeError(f"backend 'cpp' was forced but {_load_native() or 'dopsd_fast._C has no CUDA kernels'}")
        return "cpp"
    if want not in ("auto", "cpp"):
        return want
    on_cuda = all(t.is_cuda for t in tensors)
    if native and on_cuda and tensors and native_available(cuda=True):
        return "cpp"
    if not _HAS_TRITON:
        return "reference"
    if on_cuda:
        return cuda_auto
    return "triton" if interpreting() and not any(t.is_cuda for t in tensors) else "reference"


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Force a backend inside a block (the config switch and tests use this); ``auto`` defers to outer choices."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
