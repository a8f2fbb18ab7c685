"""ema_update: one Triton launch per dtype group, or one csrc/ (cpp) launch for all, vs the reference (float
copies + _foreach_lerp_ + _foreach_copy_).

GB/s counts the fused kernel's traffic for both impls: fp32 master read + write, student read, low-precision copy
write. Only a forward pass exists (no autograd).
"""
import pytest
import torch

from dopsd_fast.ops._dispatch import native_available, use_backend
from dopsd_fast.ops.ema_update import ema_update
from dopsd_fast.ops.reference import ema_update_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROUNDS = 20 if CUDA else 1


def _z_image_lora_shapes(rank=32, layers=30, d=3840, ffn=10240):
    """LoRA A (r, in) and B (out, r) of to_q/k/v/out and w1/w2/w3 in every main layer: 420 tensors, ~70 M values."""
    linears = [(d, d)] * 4 + [(d, ffn), (ffn, d), (d, ffn)]
    return [sh for _ in range(layers) for fi, fo in linears for sh in ((rank, fi), (fo, rank))]


SIZES = {"z_image_lora_r32": _z_image_lora_shapes(), "many_small_2000x4097": [(4097,)] * 2000} if CUDA else \
    {"tiny_cpu": [(1,), (3,), (1000,), (4097,), (7, 123)]}
# student dtype, teacher_lowp dtype (None: no copy)
VARIANTS = {"bf16_student+bf16_copy": (torch.bfloat16, torch.bfloat16), "fp32_student": (torch.float32, None)}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["reference", "triton", "cpp"])
def test_ema_update(benchmark, size, variant, impl):
    if impl == "cpp" and not native_available(cuda=CUDA):
        pytest.skip("dopsd_fast._C not built (with CUDA)")
    s_dtype, l_dtype = VARIANTS[variant]
    shapes = SIZES[size]
    teacher = [torch.randn(sh, device=DEVICE) for sh in shapes]
    student = [torch.randn(sh, device=DEVICE).to(s_dtype) for sh in shapes]
    lowp = None if l_dtype is None else [torch.empty(sh, device=DEVICE, dtype=l_dtype) for sh in shapes]
    numel = sum(t.numel() for t in teacher)
    benchmark.group = f"ema_update-{size}-{variant}-fwd"

    def run():
        if impl == "reference":
            ema_update_ref(teacher, student, 0.9999, lowp)
        else:
            with use_backend(impl):
                ema_update(teacher, student, 0.9999, lowp)
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    nbytes = numel * (8 + s_dtype.itemsize + (l_dtype.itemsize if l_dtype is not None else 0))
    benchmark.extra_info.update(bytes=nbytes, tensors=len(shapes))
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
