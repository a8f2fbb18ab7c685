"""merge_state: Triton LSE merge of two partial attention states vs the PyTorch reference, fwd / bwd / full.

Memory-bound: GB/s counts reading o1, o2, lse1, lse2 and writing O, LSE (forward; the backward reads dO and the
saved inputs and writes do1, do2, dlse1, dlse2). CUDA: Z-Image heads (H=30, D=128), bf16, 9216 query tokens (two
4608-token rows of teacher + student). CPU: a tiny smoke (the Triton path runs under the interpreter).
"""
import pytest
import torch

from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.merge_state import merge_state

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 20 if CUDA else 1
SIZES = {"t9216_h30_d128": (9216, 30, 128)} if CUDA else {"tiny_cpu": (37, 2, 16)}


def _bytes(t: int, h: int, d: int, which: str) -> int:
    o, lse = t * h * d * torch.finfo(DTYPE).bits // 8, t * h * 4
    fwd = 3 * o + 3 * lse                     # read o1, o2, write O; read lse1, lse2, write LSE
    bwd = 5 * o + 5 * lse                     # read dO, o1, o2, write do1, do2; lse1, lse2, dLSE, write dlse1, dlse2
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[which]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("which", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_merge_state(benchmark, size, which, impl):
    t, h, d = SIZES[size]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    o1, o2 = (torch.randn(t, h, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
    lse1, lse2 = (torch.randn(h, t, device=DEVICE, generator=g) for _ in range(2))
    dout = torch.randn_like(o1)
    benchmark.group = f"merge_state-{size}-{which}"

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    def forward(grad: bool):
        ins = [x.clone().requires_grad_(grad) for x in (o1, lse1, o2, lse2)]
        with use_backend(impl), torch.set_grad_enabled(grad):
            return merge_state(*ins)[0]

    if which == "bwd":
        def setup():
            out = forward(True)
            sync()
            return (out,), {}

        def run(out):
            with use_backend(impl):
                out.backward(dout)
            sync()
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    else:
        def run():
            out = forward(which == "full")
            if which == "full":
                with use_backend(impl):
                    out.backward(dout)
            sync()
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1 if CUDA else 0)
    moved = _bytes(t, h, d, which)
    benchmark.extra_info.update(bytes=moved, dtype=str(DTYPE))
    if benchmark.stats is not None:        # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9
