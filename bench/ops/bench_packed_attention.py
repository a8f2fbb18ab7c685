"""packed_attention: Triton varlen kernel vs torch SDPA (flash backend on CUDA) vs the fp32 reference.

CUDA sizes: Z-Image heads (H=30, D=128), bf16, a batch of 2 equal segments (teacher + student rows) of 1024+512 or
4096+512 tokens (image + caption). SDPA runs the same shapes batched as (2, H, L, D). TFLOP/s counts the matmul
FLOPs (fwd 4, bwd 10 x L^2 x H x D per segment: FlashAttention's convention, bwd = 2.5 x fwd).
CPU: a tiny smoke (the Triton path runs under the interpreter).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dopsd_fast._kernels.packed_attention import attention_flops
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.packed_attention import packed_attention_with_lse
from dopsd_fast.ops.reference import packed_attention_lse_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10 if CUDA else 1
# name -> (segment lengths, heads, head_dim)
SIZES = {"2x1536_h30_d128": ([1536, 1536], 30, 128), "2x4608_h30_d128": ([4608, 4608], 30, 128)} if CUDA else \
    {"tiny_cpu": ([24, 24], 2, 16)}


def _sdpa_context():
    if not CUDA:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _forward(impl, q, k, v, cu, max_len):
    if impl == "triton":
        with use_backend("triton"):
            return packed_attention_with_lse(q, k, v, cu, cu, max_len, max_len)[0]
    if impl == "reference":
        return packed_attention_lse_ref(q, k, v, cu, cu, max_len, max_len)[0]
    n = cu.numel() - 1  # sdpa: equal segments batched as (N, H, L, D)
    shape = (n, max_len) + q.shape[1:]
    with _sdpa_context():
        out = F.scaled_dot_product_attention(*(t.view(shape).transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("which", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["reference", "sdpa", "triton"])
def test_packed_attention(benchmark, size, which, impl):
    lengths, heads, head_dim = SIZES[size]
    total, max_len = sum(lengths), max(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(total, heads, head_dim, device=DEVICE, generator=g, dtype=DTYPE) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    dout = torch.randn_like(q)
    benchmark.group = f"packed_attention-{size}-{which}"

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v)]

    if which == "fwd":
        def run():
            with torch.no_grad():
                _forward(impl, q, k, v, cu, max_len)
            sync()
        setup = None
    elif which == "bwd":
        def setup():  # the forward graph is built outside the timed region
            out = _forward(impl, *leaves(), cu, max_len)
            sync()
            return (out,), {}

        def run(out):
            out.backward(dout)
            sync()
    else:
        def run():
            _forward(impl, *leaves(), cu, max_len).backward(dout)
            sync()
        setup = None

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    if setup is None:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    else:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    flops = attention_flops(lengths, lengths, heads, head_dim, which)
    benchmark.extra_info.update(flops=flops, tokens=total, heads=heads, head_dim=head_dim, dtype=str(DTYPE))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
