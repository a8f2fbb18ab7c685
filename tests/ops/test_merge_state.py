"""merge_state: Triton launchers vs reference, the derived backward vs autograd and finite differences, custom op."""
import pytest
import torch

from dopsd_fast._kernels import merge_state as _k
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.merge_state import merge_state
from dopsd_fast.ops.reference import merge_state_bwd_ref, merge_state_ref

NEG_INF = float("-inf")
# (dtype, rtol, atol) judged against the reference computed in fp32 from the same (rounded) inputs: the output is
# one fp32 -> dtype rounding (bf16 2^-8, fp16 2^-11 relative); values are O(1).
TOLERANCES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 8e-3, 8e-3)]


def make_state(t, h, d, dtype=torch.float32, seed=0, empty_rows=True):
    """o1, lse1, o2, lse2 with some -inf LSEs (a key set empty for that row) and one row with both empty."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    o1, o2 = (torch.randn(t, h, d, generator=g).to(dtype) for _ in range(2))
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the op's contract: fp32
    lse1, lse2 = (3 * torch.randn(h, t, generator=g, dtype=lse_dtype) for _ in range(2))
    if empty_rows and t >= 4:
        lse1[0, 1] = NEG_INF  # only set 2
        lse2[-1, 2] = NEG_INF  # only set 1
        lse1[0, 3] = lse2[0, 3] = NEG_INF  # no keys at all
    return o1, lse1, o2, lse2


def poisoned(*like):
    return [torch.full_like(t, float("nan")) for t in like]


@pytest.mark.parametrize("dtype,rtol,atol", TOLERANCES)
@pytest.mark.parametrize("t,h,d", [(1, 1, 16), (7, 3, 24), (123, 2, 64)])
def test_launchers_match_reference(device, t, h, d, dtype, rtol, atol):
    o1, lse1, o2, lse2 = make_state(t, h, d, dtype)
    out, out_lse = poisoned(o1, lse1)
    got, got_lse = _k.merge_state_fwd(o1, lse1, o2, lse2, out=out, out_lse=out_lse)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    want, want_lse = merge_state_ref(o1.float(), lse1, o2.float(), lse2)
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)  # -inf where both empty, compared exactly

    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    dout, dlse = torch.randn(o1.shape, generator=g).to(dtype), torch.randn(lse1.shape, generator=g)
    bufs = poisoned(o1, lse1, o2, lse2)
    got = _k.merge_state_bwd(dout, dlse, o1, lse1, o2, lse2, do1=bufs[0], dlse1=bufs[1], do2=bufs[2], dlse2=bufs[3])
    want = merge_state_bwd_ref(dout.float(), dlse, o1.float(), lse1, o2.float(), lse2)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a.float(), b, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
    # dLSE omitted == zeros
    got0 = _k.merge_state_bwd(dout, None, o1, lse1, o2, lse2)
    want0 = merge_state_bwd_ref(dout.float(), torch.zeros_like(dlse), o1.float(), lse1, o2.float(), lse2)
    for a, b in zip(got0, want0):
        torch.testing.assert_close(a.float(), b, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))


def test_reference_definition_and_empty_rows():
    o1, lse1, o2, lse2 = make_state(9, 2, 16, torch.float64, empty_rows=True)
    out, lse = merge_state_ref(o1, lse1, o2, lse2)
    # Definition: LSE = logaddexp, O = sum_i exp(lse_i - LSE) O_i, on the rows with at least one key.
    ok = torch.isfinite(lse)
    want_lse = torch.logaddexp(lse1, lse2)
    torch.testing.assert_close(lse[ok], want_lse[ok], rtol=1e-12, atol=1e-12)
    w1, w2 = torch.exp(lse1 - want_lse).t()[..., None], torch.exp(lse2 - want_lse).t()[..., None]
    want = w1 * o1 + w2 * o2
    torch.testing.assert_close(out[ok.t()], want[ok.t()], rtol=1e-12, atol=1e-12)
    assert lse[0, 3] == NEG_INF and (out[3, 0] == 0).all()  # no keys at all: O = 0, LSE = -inf
    torch.testing.assert_close(out[1, 0], o2[1, 0])  # only set 2 present: exactly its state
    torch.testing.assert_close(lse[0, 1], lse2[0, 1])


def test_backward_formula_gradcheck_float64():
    """The derived backward (custom op, reference backend) vs finite differences, and vs autograd through the ref."""
    o1, lse1, o2, lse2 = (x.requires_grad_() for x in make_state(5, 2, 8, torch.float64, seed=3, empty_rows=False))
    lse2.data[1, 2] = NEG_INF  # one row with a single key set: its gradient w.r.t. lse2 there is 0
    with use_backend("reference"):
        def fn(a, b, c, d):
            out, lse = merge_state(a, b, c, d)
            return out, torch.where(torch.isfinite(lse), lse, 0.0)
        inputs = (o1, lse1, o2, lse2)
        fd_inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
        fd_inputs[3].data[1, 2] = -1e30  # finite stand-in for -inf so finite differences stay defined
        assert torch.autograd.gradcheck(fn, fd_inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    g = torch.Generator(torch.get_default_device()).manual_seed(4)
    dout, dlse = torch.randn(o1.shape, generator=g, dtype=torch.float64), torch.randn(lse1.shape, generator=g,
                                                                                     dtype=torch.float64)
    out, lse = merge_state_ref(o1, lse1, o2, lse2)
    auto = torch.autograd.grad((out, lse), (o1, lse1, o2, lse2), (dout, dlse))
    formula = merge_state_bwd_ref(dout, dlse, o1.detach(), lse1.detach(), o2.detach(), lse2.detach())
    for a, b in zip(formula, auto):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)  # the formula computes in fp32


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,rtol,atol", [TOLERANCES[0], TOLERANCES[2]])
def test_custom_op_forward_backward(device, backend, dtype, rtol, atol):
    o1, lse1, o2, lse2 = make_state(37, 3, 32, dtype, seed=5)
    leaves = [x.clone().requires_grad_() for x in (o1, lse1, o2, lse2)]
    gold = [x.detach().float().requires_grad_() for x in (o1, lse1, o2, lse2)]
    g = torch.Generator(torch.get_default_device()).manual_seed(6)
    w_out, w_lse = torch.randn(o1.shape, generator=g), torch.randn(lse1.shape, generator=g)

    def loss(out, lse):  # uses both outputs, so dLSE != 0 reaches the backward
        return (out.float() * w_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * w_lse).sum()

    with use_backend(backend):
        out, lse = merge_state(*leaves)
        loss(out, lse).backward()
    want_out, want_lse = merge_state_ref(*gold)
    loss(want_out, want_lse).backward()
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    for a, b in zip(leaves, gold):
        assert a.grad.dtype == a.dtype
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))


def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    o1, lse1, o2, lse2 = make_state(20, 2, 16, seed=7, empty_rows=False)

    def fn(a, b, c, d):
        out, lse = merge_state(a, b, c, d)
        return (out * out).sum() + lse.sum()

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (o1, lse1, o2, lse2)]
        loss = f(*leaves)
        loss.backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck_registrations():
    """Schema, fake tensor, autograd registration and AOT dispatch of dopsd::merge_state (reference backend)."""
    from dopsd_fast.ops.merge_state import _merge_state_op

    inputs = [x.requires_grad_() for x in make_state(6, 2, 16, seed=8, empty_rows=False)]
    with use_backend("reference"):
        torch.library.opcheck(_merge_state_op, tuple(inputs))


def test_shape_errors():
    o1, lse1, o2, lse2 = make_state(4, 2, 16)
    with pytest.raises(ValueError, match="lse2"):
        _k.merge_state_fwd(o1, lse1, o2, lse2.t().contiguous())
    with pytest.raises(ValueError, match="dtype"):
        _k.merge_state_fwd(o1, lse1, o2.half(), lse2)
