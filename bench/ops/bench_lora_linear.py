"""lora_linear (one base GEMM + per-segment LoRA epilogue) vs the reference vs the base GEMM alone (F.linear).

The packed batch is half teacher rows (adapter 1, frozen) and half student rows (adapter 0, trainable); x needs
grad (it comes from the layer below), the base is frozen. "base_linear" is the floor: the frozen GEMM without
any LoRA. TFLOP/s use each impl's useful FLOPs: base 2·T·in·out per GEMM; LoRA adds 2·T·r·(in+out) to fwd and
dX, and 2·T_student·r·(in+out) for dA, dB of the student.
"""
import pytest
import torch
from _passes import CUDA, sync, time_pass
import torch.nn.functional as F

from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.lora_linear import lora_linear
from dopsd_fast.ops.reference import lora_linear_ref

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
# (T, in, out, r): Z-Image D=3840 (attention projections), FFN 3840 <-> 10240; 4096-9000 packed rows, r = 64.
SIZES = {"zimage_proj_T4096": (4096, 3840, 3840, 64), "zimage_proj_T9000": (9000, 3840, 3840, 64),
         "zimage_ffn_up_T9000": (9000, 3840, 10240, 64), "zimage_ffn_down_T9000": (9000, 10240, 3840, 64)} if CUDA \
    else {"tiny_cpu": (37, 48, 100, 4)}
IMPLS = ["reference", "triton", "base_linear"]


def _inputs(T, n_in, n_out, r):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE).to(DTYPE)  # noqa: E731
    x = rnd(T, n_in).requires_grad_()
    w, b = rnd(n_out, n_in) / n_in**0.5, rnd(n_out)
    A = [rnd(r, n_in) / n_in**0.5 for _ in range(2)]
    B = [rnd(n_out, r) / r**0.5 for _ in range(2)]
    A[0].requires_grad_(), B[0].requires_grad_()       # student trainable, teacher (index 1) frozen
    off = torch.tensor([0, T // 2, T], dtype=torch.int32, device=DEVICE)
    ad = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    return x, w, b, A, B, off, ad


def _forward(impl, x, w, b, A, B, off, ad):
    if impl == "base_linear":
        return F.linear(x, w, b)
    if impl == "reference":
        return lora_linear_ref(x, w, b, A, B, 2.0, off, ad)
    with use_backend("triton"):
        return lora_linear(x, w, b, A, B, 2.0, off, ad)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "full"])
def test_lora_linear(benchmark, size, impl, pass_):
    T, n_in, n_out, r = SIZES[size]
    args = _inputs(T, n_in, n_out, r)
    x, _, _, A, B, _, _ = args
    leaves = [x, A[0], B[0]]
    benchmark.group = f"lora_linear-{size}-{pass_}"
    dy = torch.randn(T, n_out, device=DEVICE, dtype=DTYPE)

    def clear():
        for t in leaves:
            t.grad = None

    def fwd():
        with torch.no_grad():
            out = _forward(impl, *args)
        sync()
        return out

    def setup_bwd():
        clear()
        return (_forward(impl, *args),), {}

    def bwd(y):
        y.backward(dy)
        sync()

    def full():
        clear()
        _forward(impl, *args).backward(dy)
        sync()

    gemm, lora = 2 * T * n_in * n_out, 2 * T * r * (n_in + n_out)
    flops = {"fwd": gemm, "bwd": gemm} if impl == "base_linear" else \
        {"fwd": gemm + lora, "bwd": gemm + lora + lora // 2}
    flops["full"] = flops["fwd"] + flops["bwd"]
    time_pass(benchmark, pass_, fwd, full, bwd, setup_bwd, flops[pass_], "TFLOP/s")


# ---------------------------------------------------------------------------------------------- LoRALinear.forward
# One active adapter, as the trainer runs it: LoRALinear.forward adds scale * (x A^T) B^T to the base output inside
# the up-projection's GEMM (addmm, beta 1, alpha scale); "peft_formula" is PEFT's `base(x) + B(A(x)) * scale` on the
# same layer, the form both wrote before. CUDA: 1024^2 rows in bf16; CPU: bench_e2e's cpu-small in fp32 (+ smoke).
MODULE_DTYPE = DTYPE if CUDA else torch.float32
# (CUDA: the FFN up-projection only, the widest output, so that device_check.sh's bench_ops stage keeps its limit.)
MODULE_SIZES = {"zimage_ffn_up_T4352": (4352, 3840, 10240, 64)} \
    if CUDA else {"tiny_cpu": (37, 48, 100, 4), "cpu_small_ffn_up": (320, 256, 682, 16)}
MODULE_ROUNDS = {"zimage_ffn_up_T4352": 20, "tiny_cpu": 1, "cpu_small_ffn_up": 100}


@pytest.mark.parametrize("size", list(MODULE_SIZES))
@pytest.mark.parametrize("impl", ["addmm", "peft_formula"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "full"])
def test_lora_module(benchmark, size, impl, pass_):
    from dopsd_fast.nn.lora_linear import LoRALinear

    T, n_in, n_out, r = MODULE_SIZES[size]
    torch.manual_seed(0)
    base = torch.nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=MODULE_DTYPE).requires_grad_(False)
    layer = LoRALinear(base, ["student"], r, 2.0 * r)
    with torch.no_grad():
        layer.lora_B["student"].normal_(std=r**-0.5)
    a, b = layer.lora_A["student"], layer.lora_B["student"]
    x = torch.randn(T, n_in, device=DEVICE, dtype=MODULE_DTYPE).requires_grad_()
    dy = torch.randn(T, n_out, device=DEVICE, dtype=MODULE_DTYPE)

    def peft_formula():
        return F.linear(x, layer.weight) + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * layer.scale

    forward = (lambda: layer(x)) if impl == "addmm" else peft_formula

    def grads():
        out = [t.grad for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return out

    forward().backward(dy)            # the two forms compute the same layer: outputs and gradients agree
    got = grads()
    peft_formula().backward(dy)
    tol = dict(rtol=2e-2, atol=2e-2) if MODULE_DTYPE == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for g_, w_ in zip(got, grads()):
        torch.testing.assert_close(g_, w_, **tol)
    benchmark.group = f"lora_module-{size}-{pass_}"

    def fwd():
        with torch.no_grad():
            forward()
        sync()

    def setup_bwd():
        grads()
        return (forward(),), {}

    def bwd(y):
        y.backward(dy)
        sync()

    def full():
        grads()
        forward().backward(dy)
        sync()

    gemm, lora = 2 * T * n_in * n_out, 2 * T * r * (n_in + n_out)
    flops = {"fwd": gemm + lora, "bwd": gemm + lora + lora}
    flops["full"] = flops["fwd"] + flops["bwd"]
    time_pass(benchmark, pass_, fwd, full, bwd, setup_bwd, flops[pass_], "TFLOP/s", rounds=MODULE_ROUNDS[size])
