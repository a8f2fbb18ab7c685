"""Block epilogues: the fused Triton ops and the csrc/ extension (cpp) vs the eager PyTorch maths of the model
(dopsd_fast/ops/reference.py, with autograd through it for the backward), in the same run.

Every input is differentiable (activations, norm weights, modulation), the most work a backward can have. GB/s
counts the fused kernels' unavoidable traffic for both impls: token tensors read / written once per pass,
modulation and weights neglected (B x D). On CUDA: real model widths and token counts in bf16. On CPU: a tiny smoke
size (every impl, Triton interpreted) and bench_e2e's cpu-small shapes in fp32 (one roll-out sample's 256 image + 64
caption tokens, width 256, 4 heads of 64), reference vs cpp only (an interpreted Triton time means nothing): what
``CPU_AUTO`` in ops/_dispatch.py was chosen from.
"""
import pytest
import torch

from dopsd_fast.ops import reference as R
from dopsd_fast.ops._dispatch import native_available, use_backend
from dopsd_fast.ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# name: (tokens T, width D, samples B, heads, head_dim). Z-Image 1024^2: 4096 image + 256 caption tokens per sample.
SIZES = {"z_image_1024_b2": (2 * 4352, 3840, 2, 30, 128), "flux2_klein_1024_b1": (4096 + 512, 3072, 1, 24, 128)} \
    if CUDA else {"tiny_cpu": (37, 96, 3, 2, 48), "cpu_small": (320, 256, 1, 4, 64)}
ROUNDS = {"tiny_cpu": 1, "cpu_small": 50}      # CUDA: 20
OPS = {  # op: (ours, reference, token tensors read+written by fwd, by bwd)
    "modulated_rms_norm": (modulated_rms_norm, R.modulated_rms_norm_ref, 2, 3),
    "gated_residual": (gated_residual, R.gated_residual_ref, 3, 3),  # bwd: read a, dy; write da (dx = dy)
    "qk_norm_rope": (qk_norm_rope, R.qk_norm_rope_ref, 4, 8),  # q and k
    "modulated_layer_norm": (modulated_layer_norm, R.modulated_layer_norm_ref, 2, 3),
}


def _inputs(op, T, D, B, heads, head_dim):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, device=DEVICE).to(DTYPE).requires_grad_(True)  # noqa: E731
    si = torch.repeat_interleave(torch.arange(B, device=DEVICE), T // B)
    si = torch.cat([si, si.new_full((T - si.numel(),), B - 1)])
    if op == "modulated_rms_norm":
        return (rn(T, D), rn(D), rn(B, D), si, 1e-5)
    if op == "gated_residual":
        return (rn(T, D), rn(T, D), rn(D), rn(B, D), si, 1e-5)
    if op == "modulated_layer_norm":
        return (rn(T, D), rn(B, D), rn(B, D), si, 1e-6)
    ang = torch.randn(T, head_dim // 2, generator=g, device=DEVICE)
    return (rn(T, heads, head_dim), rn(T, heads, head_dim), rn(head_dim), rn(head_dim), ang.cos(), ang.sin(), 1e-5)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["reference", "triton", "cpp"])
def test_epilogues(benchmark, impl, op, pass_, size):
    if impl == "cpp" and (op == "modulated_layer_norm" or not native_available(cuda=CUDA)):
        pytest.skip("no csrc/ kernel for this op, or dopsd_fast._C not built (with CUDA)")
    if impl == "triton" and size == "cpu_small":
        pytest.skip("the Triton interpreter's time means nothing")
    T, D, B, heads, head_dim = SIZES[size]
    ours, ref, fwd_tensors, bwd_tensors = OPS[op]
    args = _inputs(op, T, D, B, heads, head_dim)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    fn = ref if impl == "reference" else ours
    benchmark.group = f"epilogues-{op}-{size}-{pass_}"

    def forward():
        with use_backend(impl):
            out = fn(*args)
        return out if isinstance(out, tuple) else (out,)

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    outs = forward()
    grads = [torch.randn_like(o) for o in outs]
    with use_backend(impl):
        if pass_ == "fwd":
            def run():
                with torch.no_grad():
                    forward()
                sync()
        elif pass_ == "bwd":
            def run():  # one recorded graph, replayed
                torch.autograd.grad(outs, leaves, grads, retain_graph=True)
                sync()
        else:
            def run():
                torch.autograd.grad(forward(), leaves, grads)
                sync()

        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(run, rounds=20 if CUDA else ROUNDS[size], warmup_rounds=1 if CUDA else 0)
    per_tensor = T * D * DTYPE.itemsize
    nbytes = per_tensor * {"fwd": fwd_tensors, "bwd": bwd_tensors, "full": fwd_tensors + bwd_tensors}[pass_]
    benchmark.extra_info.update(bytes=nbytes, tokens=T, width=D)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
