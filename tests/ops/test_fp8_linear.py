"""fp8_linear: the row-wise quantisation, the launchers (torch._scaled_mm), the autograd function and LoRALinear's
FP8 base, each against a reference written without the code under test.

The rounding reference is a hand-rolled table of every finite e4m3 / e5m2 value with round-to-nearest-even, so the
quantiser (a saturating cast) is checked against the formats' definitions, not against torch's cast itself.
"""
import pytest
import torch
from torch import nn

from dopsd_fast.nn.lora_linear import LoRALinear, quantize_base
from dopsd_fast.ops.fp8_linear import fp8_linear, fp8_linear_input_grad_scaled_mm, fp8_linear_scaled_mm
from dopsd_fast.ops.reference import (dequantize_rowwise, fp8_linear_input_grad_ref, fp8_linear_ref,
                                      quantize_rowwise)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (exponent bits, mantissa bits, bias, top exponent usable): e4m3fn keeps exponent 15 (only S.1111.111 is NaN),
# e5m2 reserves 31 for inf/NaN as IEEE does.
FORMATS = {E4M3: (4, 3, 7, True), E5M2: (5, 2, 15, False)}
# Shapes (T, in, out): odd T; in/out multiples of 16, as torch._scaled_mm requires.
SHAPES = [(1, 32, 16), (37, 64, 48), (130, 128, 80)]


def grid(dtype) -> torch.Tensor:
    """Every finite non-negative value of the format, ascending, in fp64: index parity = mantissa parity."""
    e_bits, m_bits, bias, top = FORMATS[dtype]
    values = []
    for e in range(2 ** e_bits - (0 if top else 1)):
        for m in range(2 ** m_bits):
            if top and e == 2 ** e_bits - 1 and m == 2 ** m_bits - 1:
                continue                                    # e4m3fn's NaN
            frac = m / 2 ** m_bits
            values.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return torch.tensor(values, dtype=torch.float64)


def round_nearest_even(v: torch.Tensor, dtype) -> torch.Tensor:
    """v (fp64) to the nearest grid value, ties to the even mantissa, saturating at the largest finite one."""
    g = grid(dtype)
    a = v.abs().clamp(max=g[-1].item())
    hi = torch.searchsorted(g, a).clamp(max=len(g) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - g[lo], g[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return torch.sign(v) * g[pick]


def rows_with_range(n_rows=24, n=64, seed=0):
    """Rows spanning 1e-6..1e3 of their max (subnormals and flushes to 0), one all-zero row, one with a single
    non-zero, magnitudes from 1e-30 to 1e30 (the scale, not the format, must absorb them)."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(n_rows, n, generator=g) * 9 - 6)
    t = torch.sign(torch.randn(n_rows, n, generator=g)) * mag * 10 ** torch.linspace(-30, 30, n_rows)[:, None]
    t[3] = 0.0
    t[5] = 0.0
    t[5, 7] = -2.5
    return t.float()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_quantize_rowwise_equals_hand_rolled_rounding(dtype):
    t = rows_with_range()
    q, scale = quantize_rowwise(t, dtype)
    fmax = grid(dtype)[-1].item()
    amax = t.abs().amax(-1)
    assert fmax == {E4M3: 448.0, E5M2: 57344.0}[dtype]
    torch.testing.assert_close(scale, torch.where(amax > 0, amax / fmax, torch.ones_like(amax)), rtol=0, atol=0)
    assert scale[3] == 1 and (q[3].float() == 0).all()
    want = round_nearest_even((t / scale[:, None]).double(), dtype)     # the same fp32 quotient, rounded by hand
    assert torch.equal(q.double(), want)
    assert q.float().abs().amax(-1)[amax > 0].eq(fmax).all()           # each row's max lands on the format's max


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_rounding_ties_subnormals_and_saturation(dtype):
    g = grid(dtype)
    mid = (g[1:] + g[:-1]) / 2                      # exact ties, incl. between subnormals
    beyond = torch.tensor([g[-1].item() * 1.01, g[-1].item() * 1e3])
    v = torch.cat([mid, -mid, g[1:6] * 0.7, beyond]).float()
    scale = torch.ones(1)
    q = (v / scale).clamp(-g[-1].item(), g[-1].item()).to(dtype)   # quantize_rowwise's cast, at scale 1
    assert torch.equal(q.double(), round_nearest_even(v.double(), dtype))
    q2, s2 = quantize_rowwise(torch.tensor([[g[-1].item(), g[-1].item() / 3]]), dtype)
    assert s2.item() == 1.0 and q2[0, 0].item() == g[-1].item()


def test_round_trip_and_relative_error():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_rowwise(w)
    back = dequantize_rowwise(q, scale, torch.float32)
    # normal e4m3 values are within half an ulp (2^-4 relative); below 2^-6 * scale the absolute step is 2^-9 * scale
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    q2, s2 = quantize_rowwise(back)                 # quantising dequantised values gives them back
    assert torch.equal(q2.float(), q.float()) and torch.equal(s2, scale)
    assert q.element_size() == 1 and scale.dtype == torch.float32


def quantised(T, n_in, n_out, dtype, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    x = torch.randn(T, n_in, generator=g).to(dtype)
    wq, ws = quantize_rowwise(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5)
    return x, wq, ws, torch.randn(n_out, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}" for s in SHAPES])
def test_emulation_is_the_gemm_of_dequantised_operands(shape):
    x, wq, ws, b = quantised(*shape, torch.float32)
    xq, xs = quantize_rowwise(x)
    want = dequantize_rowwise(xq, xs, torch.float64) @ dequantize_rowwise(wq, ws, torch.float64).t() + b.double()
    torch.testing.assert_close(fp8_linear_ref(x, wq, ws, b).double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(shape[0], shape[2], dtype=torch.float64)
    torch.testing.assert_close(fp8_linear_input_grad_ref(dy, wq, ws, "bf16"),
                               dy @ dequantize_rowwise(wq, ws, torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}" for s in SHAPES])
def test_scaled_mm_launchers_equal_the_emulation(device, shape):
    """The torch._scaled_mm calls (CPU: oneDNN; CUDA: cuBLAS) on the same FP8 operands as the emulation: equal up
    to summation order and the bf16 output rounding (2^-8 of the largest output; fast accumulation on CUDA)."""
    x, wq, ws, b = quantised(*shape, torch.bfloat16)
    want = fp8_linear_ref(x, wq, ws, b).float()
    tol = 2 ** -7 * want.abs().max().item()
    torch.testing.assert_close(fp8_linear_scaled_mm(x, wq, ws, b).float(), want, rtol=0, atol=tol)
    dy = torch.randn(shape[0], shape[2]).to(torch.bfloat16)
    want = fp8_linear_input_grad_ref(dy, wq, ws, "e5m2").float()
    torch.testing.assert_close(fp8_linear_input_grad_scaled_mm(dy, wq, ws).float(), want, rtol=0,
                               atol=2 ** -7 * want.abs().max().item())


# (dtype, input_grad, forward tol, dX tol) as fractions of the reference's largest magnitude: the reference runs in
# fp64 on the same quantised operands, so fp32 differs by summation order; bf16 adds its output rounding (2^-8) and
# the LoRA term's bf16 GEMMs; e5m2 gradients keep 2 mantissa bits (2^-3 per element, averaged over the reduction).
CASES = [(torch.float32, "bf16", 1e-5, 1e-5), (torch.bfloat16, "bf16", 2e-2, 2e-2),
         (torch.float32, "e5m2", 1e-5, 6e-2), (torch.bfloat16, "e5m2", 2e-2, 6e-2)]


@pytest.mark.parametrize("dtype,input_grad,tol_y,tol_dx", CASES, ids=["fp32", "bf16", "fp32-e5m2", "bf16-e5m2"])
def test_lora_linear_on_fp8_base_forward_backward(device, dtype, input_grad, tol_y, tol_dx):
    """LoRALinear after quantize_base vs an fp64 reference on the dequantised weight: Y = deq(Q(X)) W^T + b +
    s (X A^T) B^T, dX by the straight-through rule (dY W + s (dY B) A); dA, dB of the fp32 student adapter."""
    T, n_in, n_out, r = 37, 64, 48, 4
    if device == "cuda":        # torch._scaled_mm's forward with Hopper's fast accumulation (FAST_ACCUM_FORWARD)
        tol_y = max(tol_y, 1e-3)
    g = torch.Generator(device).manual_seed(3)
    base = nn.Linear(n_in, n_out).to(dtype).requires_grad_(False)
    m = LoRALinear(base, ["student", "teacher"], r, 2.0 * r)
    with torch.no_grad():
        m.lora_B["student"].copy_(torch.randn(n_out, r, generator=g) / r)
    w = base.weight.detach().clone()
    assert quantize_base(m, input_grad) == 1 and m.weight.dtype == E4M3 and not m.weight.requires_grad
    x = torch.randn(T, n_in, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(T, n_out, generator=g).to(dtype)
    y = m(x)
    y.backward(dy)

    wq, ws = quantize_rowwise(w)
    torch.testing.assert_close(wq.float(), m.weight.float(), rtol=0, atol=0)
    w64 = dequantize_rowwise(wq, ws, torch.float64)
    xr = x.detach().double().requires_grad_(True)
    x_deq = dequantize_rowwise(*quantize_rowwise(x.detach()), torch.float64)
    a, b_ = (p.detach().double().requires_grad_(True) for p in (m.lora_A["student"], m.lora_B["student"]))
    y_ref = (x_deq + xr - xr.detach()) @ w64.t() + m.bias.double() + m.scale * (xr @ a.t()) @ b_.t()
    y_ref.backward(dy.double())

    def close(got, want, tol):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * want.abs().max().item())

    close(y, y_ref.detach(), tol_y)
    close(x.grad, xr.grad, tol_dx)
    close(m.lora_A["student"].grad, a.grad, tol_y)
    close(m.lora_B["student"].grad, b_.grad, tol_y)
    assert m.lora_A["student"].grad.dtype == torch.float32 and m.lora_A["teacher"].grad is None


def test_fp8_linear_refuses_and_keeps_shapes():
    x, wq, ws, _ = quantised(6, 32, 16, torch.float32)
    assert fp8_linear(x.reshape(2, 3, 32), wq, ws).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="input_grad"):
        fp8_linear(x, wq, ws, input_grad="e4m3")
    m = LoRALinear(nn.Linear(32, 16), ["student"], 2, 2.0)
    with pytest.raises(ValueError, match="frozen base"):
        m.quantize_base()
