"""rollout_step: fused Triton kernel and the csrc/ extension (cpp) vs the pure-PyTorch reference (Euler step +
per-sample squared error + grad).

GB/s counts the fused kernel's traffic for both impls (the reference moves more): fwd reads x, out_s, out_t and
writes x_next and the fp32 gradient; bwd reads the fp32 gradient and writes d/d out_s.
"""
import pytest
import torch
from _passes import CUDA, sync, time_pass

from dopsd_fast.ops._dispatch import native_available, use_backend
from dopsd_fast.ops.reference import rollout_step_ref
from dopsd_fast.ops.rollout_step import rollout_step

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
# per-sample latent numels: Z-Image 1024^2 = 16x128x128; klein 1024^2 / 768^2 = 128x64x64 / 128x48x48 (patchified)
SIZES = {"z_image_1024_b1": [262144], "klein_1024+768_b4": [524288, 294912, 524288, 294912]} if CUDA else \
    {"tiny_cpu": [7, 1000, 4099]}


def _inputs(lengths):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    total, batch = sum(lengths), len(lengths)
    x, s, t = (torch.randn(total, generator=g, device=DEVICE).to(DTYPE) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    step = torch.full((batch,), 0.25, device=DEVICE)
    loss = torch.full((batch,), 0.75, device=DEVICE)
    return x, s.requires_grad_(), t, cu, step, loss


def _forward(impl, args):
    if impl == "reference":
        return rollout_step_ref(*args)
    with use_backend(impl):   # triton, or cpp: the csrc/ extension (CUDA kernel; the C++ twin on CPU)
        return rollout_step(*args)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "full"])
def test_rollout_step(benchmark, size, impl, pass_):
    if impl == "cpp" and not native_available(cuda=CUDA):
        pytest.skip("dopsd_fast._C not built (with CUDA)")
    lengths = SIZES[size]
    total, es = sum(lengths), DTYPE.itemsize
    args = _inputs(lengths)
    benchmark.group = f"rollout_step-{size}-{pass_}"

    def fwd():
        out = _forward(impl, args)
        sync()
        return out

    def setup_bwd():
        args[1].grad = None
        _, sq_sum = _forward(impl, args)
        return (sq_sum.sum() / total,), {}

    def bwd(loss):
        loss.backward()
        sync()

    def full():
        args[1].grad = None
        _, sq_sum = _forward(impl, args)
        (sq_sum.sum() / total).backward()
        sync()

    nbytes = {"fwd": total * (4 * es + 4), "bwd": total * (4 + es)}
    nbytes["full"] = nbytes["fwd"] + nbytes["bwd"]
    time_pass(benchmark, pass_, fwd, full, bwd, setup_bwd, nbytes[pass_], "GB/s")
