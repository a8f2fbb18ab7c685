"""packed_attention: every exact attention backend the machine has, per shape, next to the FlashAttention anchors.

CUDA sizes: Z-Image heads (H=30, D=128), bf16, two samples (teacher + student rows) of 1024+512 or 4096+512 tokens
(image + caption) of equal length, and 4608 + 4480 tokens: two samples whose captions differ. Implementations:
  reference         packed_attention_lse_ref, fp32 math (the LSE oracle)
  sdpa-flash, sdpa-cudnn, sdpa-efficient
                    packed_attention_ref restricted to one SDPA backend: equal segments batched as (S, H, L, D),
                    unequal ones one call per segment after a cu_seqlens.tolist() host sync
  varlen_attn       torch.nn.attention.varlen.varlen_attn: one FlashAttention-2 launch over all segments
  fa2, fa3          flash_attn_varlen_func of flash_attn / flash_attn_interface (the Hopper build), when importable
  packed_attention  the functional as the models call it (``auto`` dispatch)
  triton            our varlen kernel (packed_attention_with_lse)
An implementation that is missing or refuses the shape, dtype or device is skipped with the reason. TFLOP/s counts
the matmul FLOPs (fwd 4, bwd 10 x L^2 x H x D per segment: FlashAttention's convention, bwd = 2.5 x fwd); every
record carries ANCHORS_TFLOPS next to it.
CPU: a tiny smoke (the Triton path runs under the interpreter); the CUDA-only backends skip.
"""
import importlib
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dopsd_fast._kernels.packed_attention import attention_flops
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.packed_attention import packed_attention, packed_attention_with_lse
from dopsd_fast.ops.reference import packed_attention_lse_ref, packed_attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10 if CUDA else 1
# name -> (segment lengths, heads, head_dim)
SIZES = {
    "2x1536_h30_d128": ([1536, 1536], 30, 128),
    "2x4608_h30_d128": ([4608, 4608], 30, 128),
    "4608+4480_h30_d128": ([4608, 4480], 30, 128),
} if CUDA else {"tiny_cpu": ([24, 24], 2, 16), "tiny_cpu_unequal": ([24, 17], 2, 16)}
# Published TFLOP/s on one H100, head dim 128, (low, high) over the paper's sequence lengths: FlashAttention-3
# (Shah et al., 2024) for FA3 and its FA2 baseline. The yardstick for the "fwd" and "bwd" records here.
ANCHORS_TFLOPS = {"source": "FlashAttention-3 paper, H100, head dim 128",
                  "fa3": {"fwd": (625, 648), "bwd": (501, 561)}, "fa2": {"fwd": (362, 370), "bwd": (291, 322)}}
CUDA_ONLY = {"sdpa-cudnn", "sdpa-efficient", "varlen_attn", "fa2", "fa3"}


def _sdpa_only(backend: SDPBackend):
    def run(q, k, v, cu, max_len):
        with sdpa_kernel(backend):
            return packed_attention_ref(q, k, v, cu, max_len)
    return run


def _flash_varlen(module_name: str):
    """flash_attn_varlen_func of an installed FlashAttention build, or why there is none."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"{module_name} is not importable: {err}"

    def run(q, k, v, cu, max_len):
        out = module.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE
    return run


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 on)"
    return lambda q, k, v, cu, max_len: varlen_attn(q, k, v, cu, cu, max_len, max_len)


def _triton(q, k, v, cu, max_len):
    with use_backend("triton"):
        return packed_attention_with_lse(q, k, v, cu, cu, max_len, max_len)[0]


# name -> fn(q, k, v, cu_seqlens, max_seqlen) -> O, or the reason it is unavailable
IMPLS = {
    "reference": lambda q, k, v, cu, max_len: packed_attention_lse_ref(q, k, v, cu, cu, max_len, max_len)[0],
    "sdpa-flash": _sdpa_only(SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": _sdpa_only(SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": _sdpa_only(SDPBackend.EFFICIENT_ATTENTION),
    "varlen_attn": _torch_varlen(),
    "fa2": _flash_varlen("flash_attn"),
    "fa3": _flash_varlen("flash_attn_interface"),
    "packed_attention": packed_attention,
    "triton": _triton,
}


def _skip_if_refused(forward, leaves, dout, which, label):
    """One untimed call (forward, and backward unless ``which`` is fwd); a backend that refuses it is skipped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if which == "fwd":
                with torch.no_grad():
                    forward(*leaves())
            else:
                forward(*leaves()).backward(dout)
        except (RuntimeError, NotImplementedError) as err:
            # SDPA's "No available kernel" says why only in the warnings it emits first
            why = "; ".join(str(w.message) for w in caught) or str(err).splitlines()[0]
            pytest.skip(f"{label} refused: {why[:400]}")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("which", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_packed_attention(benchmark, size, which, impl):
    if isinstance(IMPLS[impl], str):
        pytest.skip(IMPLS[impl])
    if impl in CUDA_ONLY and not CUDA:
        pytest.skip(f"{impl} is CUDA-only; this is the CPU smoke")
    lengths, heads, head_dim = SIZES[size]
    total, max_len = sum(lengths), max(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(total, heads, head_dim, device=DEVICE, generator=g, dtype=DTYPE) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    dout = torch.randn_like(q)
    benchmark.group = f"packed_attention-{size}-{which}"

    def forward(q, k, v):
        return IMPLS[impl](q, k, v, cu, max_len)

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v)]

    _skip_if_refused(forward, leaves, dout, which, f"{impl} at {size} ({DTYPE}, {DEVICE})")
    if which == "fwd":
        def run():
            with torch.no_grad():
                forward(q, k, v)
            sync()
        setup = None
    elif which == "bwd":
        def setup():  # the forward graph is built outside the timed region
            out = forward(*leaves())
            sync()
            return (out,), {}

        def run(out):
            out.backward(dout)
            sync()
    else:
        def run():
            forward(*leaves()).backward(dout)
            sync()
        setup = None

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    if setup is None:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    else:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    flops = attention_flops(lengths, lengths, heads, head_dim, which)
    benchmark.extra_info.update(flops=flops, tokens=total, segments=lengths, heads=heads, head_dim=head_dim,
                                dtype=str(DTYPE), device=torch.cuda.get_device_name() if CUDA else "cpu",
                                anchors_tflops=ANCHORS_TFLOPS)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
