"""lora_linear at all four tiers (launcher, custom op, functional, LoRALinear.forward_segments) vs the reference.

Every low-precision result is judged against the reference computed in fp32 from the same (rounded) inputs.
"""
import pytest
import torch
from torch import nn

from dopsd_fast._kernels import lora_linear as K
from dopsd_fast.nn.lora_linear import LoRALinear
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.lora_linear import lora_linear
from dopsd_fast.ops.reference import lora_linear_bwd_ref, lora_linear_ref

# (dtype, rtol, atol as a fraction of the fp32 reference's largest magnitude): fp32 differs by summation order only;
# bf16 keeps 8 mantissa bits (and the interpreter's fp32->bf16 cast truncates), fp16 keeps 11.
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)]
TOL = {d: (r, a) for d, r, a in TOLERANCES}

# (T, in, out, r, segment lengths, adapter per segment): odd sizes, 1-3 segments, a -1 and an empty segment.
CASES = [
    (1, 48, 100, 4, [1], [0]),
    (37, 100, 48, 8, [10, 10, 17], [1, -1, 0]),
    (130, 130, 100, 8, [50, 0, 80], [1, 0, -1]),
    (130, 48, 130, 4, [65, 65], [0, 1]),
]
IDS = ["T1", "T37-3seg", "T130-empty-seg", "T130-2seg"]
SCALE = 1.75


def segments(lengths, adapters):
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return offsets, torch.tensor(adapters, dtype=torch.int32)


def make(T, n_in, n_out, r, dtype, seed=0, n_adapters=2):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, w, b = rnd(T, n_in), rnd(n_out, n_in) / n_in**0.5, rnd(n_out)
    A = [rnd(r, n_in) / n_in**0.5 for _ in range(n_adapters)]
    B = [rnd(n_out, r) / r**0.5 for _ in range(n_adapters)]
    return x, w, b, A, B


def f32(ts):
    return [t.float() for t in ts]


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * max(want.abs().max().item(), 1e-6))


def u_ref(x, A, off, ad):
    u = torch.zeros(x.shape[0], A[0].shape[0])
    for lo, hi, a in zip(off.tolist()[:-1], off.tolist()[1:], ad.tolist()):
        if a >= 0:
            u[lo:hi] = x[lo:hi].float() @ A[a].float().t()
    return u


# ------------------------------------------------------------------------------------------- (a) launchers

@pytest.mark.parametrize("dtype", [d for d, _, _ in TOLERANCES])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_launchers_match_reference(device, case, dtype):
    T, n_in, n_out, r, lengths, adapters = case
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, dtype)
    y = torch.full((T, n_out), float("nan"), dtype=dtype)
    u = torch.full((T, r), float("nan"))
    got_y, got_u = K.lora_linear_fwd(x, w, b, A, B, SCALE, off, ad, out=y, u=u)
    assert got_y is y and got_u is u
    close(y, lora_linear_ref(*f32([x, w, b]), f32(A), f32(B), SCALE, off, ad), dtype)
    close(u, u_ref(x, A, off, ad), dtype)

    dy = torch.randn(T, n_out, generator=torch.Generator(torch.get_default_device()).manual_seed(1)).to(dtype)
    dx = torch.full((T, n_in), float("nan"), dtype=dtype)
    got = K.lora_linear_bwd(dy, x, w, A, B, u, SCALE, off, ad, True, [0, 1], True, True, dx=dx)
    want = lora_linear_bwd_ref(*f32([dy, x, w]), f32(A), f32(B), SCALE, off, ad, True, [0, 1], True, True)
    assert got[0] is dx
    for g_, w_ in zip([got[0], *got[1], *got[2], got[3], got[4]], [want[0], *want[1], *want[2], want[3], want[4]]):
        close(g_, w_, dtype)


def test_bwd_reference_matches_autograd_through_reference():
    T, n_in, n_out, r, lengths, adapters = CASES[2]
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, torch.float64)
    leaves = [t.requires_grad_() for t in (x, w, b, *A, *B)]
    dy = torch.randn(T, n_out, dtype=torch.float64)
    grads = torch.autograd.grad(lora_linear_ref(x, w, b, A, B, SCALE, off, ad), leaves, dy)
    dx, dA, dB, dw, db = lora_linear_bwd_ref(dy, x, w, A, B, SCALE, off, ad, True, [0, 1], True, True)
    for g_, w_ in zip([dx, dw, db, *dA, *dB], grads):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ (b) custom op fwd + bwd, both backends

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1:3], ids=IDS[1:3])
def test_op_forward_backward_vs_autograd_reference(device, case, dtype, backend):
    """Student (adapter 0) trainable, teacher (adapter 1) frozen, base frozen: dX, dA_0, dB_0; None elsewhere."""
    T, n_in, n_out, r, lengths, adapters = case
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, dtype)
    for t in (x, A[0], B[0]):
        t.requires_grad_()
    dy = torch.randn(T, n_out, generator=torch.Generator(torch.get_default_device()).manual_seed(2)).to(dtype)
    with use_backend(backend):
        y = lora_linear(x, w, b, A, B, SCALE, off, ad)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == (T, n_out)
    assert A[1].grad is None and B[1].grad is None and w.grad is None and b.grad is None

    xr, Ar, Br = (t.detach().float().requires_grad_() for t in (x, A[0], B[0]))
    yr = lora_linear_ref(xr, w.float(), b.float(), [Ar, A[1].float()], [Br, B[1].float()], SCALE, off, ad)
    yr.backward(dy.float())
    close(y, yr, dtype)
    for got, want in [(x.grad, xr.grad), (A[0].grad, Ar.grad), (B[0].grad, Br.grad)]:
        assert got.dtype == dtype
        close(got, want, dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_trainable_base_and_partial_grads(device, backend):
    """dW/db when the base requires grad; only B of an adapter trainable -> dA None; x frozen -> no dX."""
    T, n_in, n_out, r, lengths, adapters = CASES[1]
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, torch.float32)
    for t in (w, b, B[1]):
        t.requires_grad_()
    with use_backend(backend):
        lora_linear(x, w, b, A, B, SCALE, off, ad).square().sum().backward()
    wr, br, Br = (t.detach().clone().requires_grad_() for t in (w, b, B[1]))
    lora_linear_ref(x, wr, br, A, [B[0], Br], SCALE, off, ad).square().sum().backward()
    for got, want in [(w.grad, wr.grad), (b.grad, br.grad), (B[1].grad, Br.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert A[1].grad is None and A[0].grad is None and B[0].grad is None


def test_no_grad_forward_and_stacked_adapters_and_leading_dims():
    T, n_in, n_out, r, lengths, adapters = CASES[3]
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, torch.float32)
    want = lora_linear_ref(x, w, b, A, B, SCALE, off, ad)
    with torch.no_grad():
        got = lora_linear(x.view(2, 65, n_in), w, None, torch.stack(A), torch.stack(B), SCALE, off, ad)
    assert got.shape == (2, 65, n_out)
    torch.testing.assert_close(got.reshape(T, n_out) + b, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ (c) module

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_segments_equals_forward_per_segment(device, dtype, backend):
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(48, 100).to(dtype), ["student", "teacher"], rank=8, alpha=12.0)
    lora.weight.requires_grad_(False)
    lora.bias.requires_grad_(False)
    with torch.no_grad():
        for p in lora.lora_B.values():
            p.normal_()
    for p in (lora.lora_A["teacher"], lora.lora_B["teacher"]):
        p.requires_grad_(False)
    lengths, names = [17, 9, 11], ["teacher", None, "student"]
    x = torch.randn(sum(lengths), 48, dtype=dtype)
    dy = torch.randn(sum(lengths), 100, dtype=dtype)
    offsets = [0, 17, 26, 37]

    xs = x.clone().requires_grad_()
    with use_backend(backend):
        y = lora.forward_segments(xs, offsets, names)
        y.backward(dy)
    got = (y.detach(), xs.grad, lora.lora_A["student"].grad, lora.lora_B["student"].grad)
    assert lora.lora_A["teacher"].grad is None and lora.lora_B["teacher"].grad is None
    lora.zero_grad(set_to_none=True)

    xp = x.clone().requires_grad_()
    parts = []
    for lo, hi, name in zip(offsets[:-1], offsets[1:], names):
        lora.active_adapter = name
        parts.append(lora(xp[lo:hi]))
    yp = torch.cat(parts)
    yp.backward(dy)
    want = (yp.detach(), xp.grad, lora.lora_A["student"].grad, lora.lora_B["student"].grad)
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype)
    assert lora.adapter_names == ["student", "teacher"]
    sd = set(lora.state_dict())
    assert sd == {"weight", "bias", *(f"lora_{m}.{n}" for m in "AB" for n in ("student", "teacher"))}


# ------------------------------------------------------------------------------------------ (d) compile

def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    T, n_in, n_out, r, lengths, adapters = CASES[1]
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, torch.float32)

    def f(x, a0, b0):
        return (lora_linear(x, w, b, [a0, A[1]], [b0, B[1]], SCALE, off, ad) * 1.5).tanh().sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A[0], B[0])]
        out = fn(*leaves)
        grads.append([out.detach(), *torch.autograd.grad(out, leaves)])
    for g_, w_ in zip(*grads):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_opcheck_schema_fake_autograd_registration():
    """torch.library.opcheck minus the slow AOT test (torch.compile above covers tracing)."""
    T, n_in, n_out, r, lengths, adapters = CASES[1]
    off, ad = segments(lengths, adapters)
    x, w, b, A, B = make(T, n_in, n_out, r, torch.float32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    fwd_args = (x.requires_grad_(), w, b, [A[0].requires_grad_(), A[1]], B, SCALE, off, ad)
    torch.library.opcheck(torch.ops.dopsd.lora_linear.default, fwd_args, test_utils=utils)
    torch.library.opcheck(torch.ops.dopsd.lora_linear_backward.default,
                          (torch.randn(T, n_out), x.detach(), w, [a.detach() for a in A], B, torch.randn(T, r), SCALE,
                           off, ad, True, [0], True, True), test_utils=utils)
