"""Host time per call of a block epilogue: the eager path (ops/_eager.py: an autograd.Function over the op's body)
vs the torch.library custom op it bypasses in eager mode (what dynamo still sees under torch.compile).

Tensors are tiny (16 tokens x 64), so a call's time is the host's: argument checks, dispatch, autograd, the
launch. Each round runs CALLS forward + backward of modulated_rms_norm on the cpp backend (the C++ CPU twin on CPU,
the CUDA kernel on a GPU, where the round ends with a synchronize); the same outputs and gradients are asserted.
``extra_info``: microseconds of wall and (on CPU) thread CPU time per call.
"""
import time

import pytest
import torch

from dopsd_fast.ops import epilogues
from dopsd_fast.ops._dispatch import native_available, use_backend

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CALLS = 200
WAYS = {"eager": epilogues.modulated_rms_norm, "custom_op": torch.ops.dopsd.modulated_rms_norm}


def _inputs():
    g = torch.Generator(DEVICE).manual_seed(0)
    x, w, s = (torch.randn(*shape, generator=g, device=DEVICE) for shape in ((16, 64), (64,), (1, 64)))
    return [t.requires_grad_(True) for t in (x, w, s)]


def _calls(fn, leaves, n=CALLS):
    for _ in range(n):
        fn(*leaves, None, 1e-5).sum().backward()
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("way", list(WAYS))
def test_op_overhead(benchmark, way):
    if not native_available(cuda=CUDA):
        pytest.skip("dopsd_fast._C is not built")
    fn, leaves = WAYS[way], _inputs()
    with use_backend("cpp"):
        ref_leaves = _inputs()
        _calls(WAYS["custom_op"], ref_leaves, 1)
        _calls(fn, leaves, 1)
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
        cpu0 = time.thread_time()
        benchmark.pedantic(_calls, args=(fn, leaves), rounds=10, warmup_rounds=1)
        cpu = (time.thread_time() - cpu0) / (11 * CALLS)
    benchmark.group = "op_overhead"
    benchmark.extra_info.update(device=DEVICE, calls_per_round=CALLS, tokens=16, width=64,
                                us_per_call=benchmark.stats.stats.median / CALLS * 1e6 if benchmark.stats else None,
                                cpu_us_per_call=None if CUDA else cpu * 1e6)
