"""Which implementation an op runs: ``cpp`` (the csrc/ extension dopsd_fast._C: CUDA kernels, and their C++ CPU
twins), ``triton`` or ``reference`` (pure PyTorch, dopsd_fast/ops/reference.py).

``auto`` (the default) runs what the op benches measured fastest for that op on that device: CUDA tensors
``CUDA_AUTO`` (library kernel or ours; a ``cpp`` choice runs Triton where the extension was built without CUDA), CPU
tensors ``CPU_AUTO`` (the C++ twin where it won, when the extension is loaded) and the reference for the rest: Triton
on CPU tensors is its interpreter (``TRITON_INTERPRET=1``, how the tests check the kernels), never the fastest, so
only a forced ``triton`` runs it. ``DOPSD_BACKEND=cpp|triton|reference`` or :func:`use_backend` forces one; a forced
``cpp`` applies to the ops the extension has (``NATIVE_OPS``), the others keep their ``auto`` choice (a forced
``triton`` on CPU tensors without the interpreter fails loudly in the launch).
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
Chosen = Literal["cpp", "triton", "reference"]

# What ``auto`` runs on CUDA tensors, per op: the fastest forward + backward median of the op bench. Measured on one
# NVIDIA H200 (torch 2.11 + CUDA 13, triton 3.6), 2026-11-26, bench/results/2026-11-26-h200-run1/bench_ops.json; ms
# at the bench's Z-Image 1024^2 shapes (FLUX.2 klein's where they differ). "reference" is PyTorch: cuBLAS, SDPA,
# torch._foreach_*. Re-measured on one NVIDIA H100 (torch 2.11 + CUDA 13.0), 2026-12-05,
# bench/results/2026-12-05-h100-run1/bench_ops.json: the same choice wins for every op (bench/README.md, "Op
# findings, H100"). Re-measure with scripts/device_check.sh and change an entry together with its numbers.
CUDA_AUTO: dict[str, Chosen] = {
    "rollout_step": "cpp",              # cpp 0.821 / triton 0.915 / reference 1.038; klein 0.807 / 0.945 / 3.579
    "ema_update": "cpp",                # fp32 master + bf16 copy (full fine-tuning): 2.915 / 3.847 / reference 5.771
    "ema_update_fp32": "reference",     # fp32 masters only (LoRA): _foreach_lerp_ 0.450 / cpp 1.428 / triton 2.024
    "modulated_rms_norm": "triton",     # triton 0.871 / cpp 1.033 / reference 6.092; klein cpp 0.744 / triton 0.856
    "gated_residual": "cpp",            # cpp 1.048 / triton 1.120 / reference 6.134; klein cpp 0.839 / ref 0.956
    "qk_norm_rope": "triton",           # triton 1.835 / cpp 2.090 / reference 6.460; klein cpp 1.277 / triton 1.317
    "modulated_layer_norm": "reference",  # klein, its one user: reference 0.318 / triton 0.701 (no cpp kernel)
    "lora_linear": "reference",         # cuBLAS + two small GEMMs 3.042 / triton 3.688 (FFN up, 9000 rows)
    "merge_state": "triton",            # triton 1.053 / reference 2.435
    "packed_attention": "reference",    # SDPA (FlashAttention-2) 7.713 / triton 15.050 (2 x 4608 tokens, 30 x 128);
                                        # H100: SDPA (cuDNN, its default there) 4.433 / triton 15.383. Unequal
                                        # segments (fp16 / bf16): torch varlen_attn (FA2) 7.852, H100; one cuDNN
                                        # SDPA call per segment 5.174 (host sync each call: not measured e2e)
    "packed_attention_lse": "triton",   # the LSE output, which SDPA lacks: triton 15.050 / reference (math) 83.551
}
# What ``auto`` runs on CPU tensors where the extension is loaded: the C++ twin for the ops whose forward, backward
# and forward + backward it ran faster than the PyTorch reference, every other op the reference. Measured at
# bench_e2e's cpu-small fp32 shapes (320 tokens x 256, 4 heads of 64) on one thread of a 2-core Xeon (AVX-512),
# torch 2.13 CPU, 2026-12-06, bench/results/2026-12-06-cpu-ops/bench_epilogues.json; medians in us, cpp / reference.
CPU_AUTO: dict[str, Chosen] = {
    "modulated_rms_norm": "cpp",        # fwd 44 / 85, bwd 174 / 468, fwd + bwd 259 / 570
    "gated_residual": "cpp",            # fwd 50 / 110, bwd 194 / 469, fwd + bwd 305 / 675
    "qk_norm_rope": "cpp",              # fwd 154 / 302, bwd 353 / 859, fwd + bwd 571 / 1274
}
NATIVE_OPS = frozenset({"rollout_step", "ema_update", "ema_update_fp32", "modulated_rms_norm", "gated_residual",
                        "qk_norm_rope"})     # the ops csrc/ implements (dopsd_C::<op>)
BACKENDS: tuple[str, ...] = ("auto", "cpp", "triton", "reference")
_forced: list[Backend] = []
_HAS_TRITON = importlib.util.find_spec("triton") is not None


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
        except OSError as err:   # e.g. built against another torch whose symbols differ
            why = f"{spec.origin} failed to load ({err}); rebuild it with `pip install -e .` against this torch"
        else:
            # a library built against another torch may load and still break (C++ ABI, dispatcher): same version only
            built = built_torch_version()
            if built == torch.__version__:
                return None
            why = (f"dopsd_fast._C was built against torch {built} but torch {torch.__version__} is running; "
                   "rebuild it with `pip install -e .`")
    warnings.warn(f"{why}. The cpp backend is unavailable; ops use Triton / the reference.", stacklevel=3)
    return why


def built_torch_version() -> str:
    """The torch version dopsd_fast._C was compiled against (after it is loaded)."""
    try:
        return torch.ops.dopsd_C.torch_version()
    except AttributeError:   # a build from before the extension reported it
        return "unknown"


def native_available(cuda: bool = False) -> bool:
    """The extension loaded (and, with ``cuda``, was built with its CUDA kernels)."""
    if _load_native() is not None:
        return False
    return not cuda or _has_cuda_kernels()


@functools.cache
def _has_cuda_kernels() -> bool:
    # asked once the library is loaded (a loaded library cannot change): a dispatcher query per op call was host time
    return torch._C._dispatch_has_kernel_for_dispatch_key("dopsd_C::rollout_step", "CUDA")


def requested_backend() -> Backend:
    # the innermost non-auto use_backend wins; "auto" (e.g. a config's default) defers to outer blocks and the env
    for name in reversed(_forced):
        if name != "auto":
            return name
    value = os.environ.get("DOPSD_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"DOPSD_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value  # type: ignore[return-value]


def backend_for(op: str, *tensors: torch.Tensor) -> Chosen:
    """The backend that op ``op`` (a ``CUDA_AUTO`` key) runs on these tensors."""
    native, want = op in NATIVE_OPS, requested_backend()
    if want == "cpp" and native:
        if not native_available(cuda=any(t.is_cuda for t in tensors)):
            raise RuntimeError(f"backend 'cpp' was forced but {_load_native() or 'dopsd_fast._C has no CUDA kernels'}")
        return "cpp"
    if want not in ("auto", "cpp"):
        return want
    if tensors and all(t.is_cuda for t in tensors):
        choice = CUDA_AUTO[op]
        if choice == "cpp" and not native_available(cuda=True):
            choice = "triton"
        return choice if _HAS_TRITON or choice != "triton" else "reference"
    return "cpp" if CPU_AUTO.get(op) == "cpp" and native_available() else "reference"


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
