"""The C++ CPU twins of csrc/ (the per-element maths the CUDA kernels share) against the PyTorch reference.

Forward and backward, random inputs, odd sizes, misaligned and strided views (the scalar paths) next to aligned
contiguous ones (the 16-byte vector paths). Tolerances are the op tests' (tests/ops): the twins compute in fp32
and round once to the output dtype, like the Triton kernels.
"""
import pytest
import torch

import dopsd_fast.ops.reference as R
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.ema_update import ema_update
from dopsd_fast.ops.epilogues import gated_residual, modulated_rms_norm, qk_norm_rope
from dopsd_fast.ops.rollout_step import rollout_step

C = torch.ops.dopsd_C
EPS = 1e-5
# x_next / d out_s: fp32 one FMA of slack, bf16 / fp16 one ulp; sq_sum fp32, summation order only
ROLLOUT_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-7, 1e-6), torch.float16: (2**-10, 1e-6)}
SQ_RTOL = 2e-6
# epilogues vs the fp32 reference on the same rounded inputs: fp32 summation order; bf16 one rounding of O(1..5)
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2)}
BWD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2)}
NATIVE_OPS = ["rollout_step", "rollout_step_backward", "ema_update", "modulated_rms_norm",
              "modulated_rms_norm_backward", "gated_residual", "gated_residual_backward", "qk_norm_rope",
              "qk_norm_rope_backward"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(got, want, dtype, table, what=""):
    rtol, atol = table[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def misaligned(t):
    """The same values one element into a fresh buffer: no 16-byte alignment, so the scalar paths run."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_schemas_equal_the_python_custom_ops(op):
    import dopsd_fast.ops.ema_update  # noqa: F401  (registers the dopsd:: ops)
    import dopsd_fast.ops.epilogues  # noqa: F401
    import dopsd_fast.ops.rollout_step  # noqa: F401

    want = str(getattr(torch.ops.dopsd, op).default._schema).replace("dopsd::", "dopsd_C::", 1)
    assert str(getattr(C, op).default._schema) == want


# ------------------------------------------------------------------------------------------------- rollout_step
def rollout_inputs(lengths, dtype, seed=0):
    g = gen(seed)
    total, batch = sum(lengths), len(lengths)
    x, s, t = (torch.randn(total, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    step = torch.rand(batch, generator=g) * 0.5 + 0.05
    loss = (torch.rand(batch, generator=g) + 0.2) * torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0)
    return x, s, t, cu, step, loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[4099], [1, 7, 0, 1000], [3, 200003]], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_rollout_step_matches_reference(dtype, lengths, aligned):
    x, s, t, cu, step, loss = rollout_inputs(lengths, dtype)
    if not aligned:
        x, s, t = map(misaligned, (x, s, t))
    x_next, sq_sum, grad = C.rollout_step(x, s, t, cu, step, loss, True)
    ref_x, _ = R.rollout_step_ref(x, s, t, cu, step, loss)
    rtol, atol = ROLLOUT_TOL[dtype]
    torch.testing.assert_close(x_next, ref_x, rtol=rtol, atol=atol)
    # the sum over 200k elements: the fp32 reference drifts by ~1e-5, so the oracle is the same sum in fp64
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    d = loss.double()[seg] * (s.double() - t.double())
    ref_sq = torch.zeros(len(lengths), dtype=torch.float64).index_add(0, seg, d * d)
    torch.testing.assert_close(sq_sum, ref_sq.float(), rtol=SQ_RTOL, atol=0.0)
    torch.testing.assert_close(grad, R.rollout_step_grad_ref(s, t, cu, loss), rtol=1e-6, atol=1e-6)

    gss = torch.randn(len(lengths), generator=gen(1))
    got = C.rollout_step_backward(grad, cu, gss, dtype)
    torch.testing.assert_close(got, (grad * gss[seg]).to(dtype), rtol=rtol, atol=atol)


def test_rollout_step_without_grad_and_mixed_dtypes():
    x, s, t, cu, step, loss = rollout_inputs([5, 0, 9], torch.float32)
    x_next, sq_sum, grad = C.rollout_step(x, s.bfloat16(), t.half(), cu, step, loss, False)
    ref_x, ref_sq = R.rollout_step_ref(x, s.bfloat16(), t.half(), cu, step, loss)
    assert grad.numel() == 0 and sq_sum[1].item() == 0.0
    torch.testing.assert_close(x_next, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sq_sum, ref_sq, rtol=SQ_RTOL, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_step_op_fwd_bwd_through_cpp_backend(dtype):
    x, s, t, cu, step, loss = rollout_inputs([1, 7, 4099], dtype, seed=1)
    weights = torch.randn(3, generator=gen(2))
    s_ref = s.clone().requires_grad_()
    ref_x, ref_sq = R.rollout_step_ref(x, s_ref, t, cu, step, loss)
    (ref_sq * weights).sum().backward()
    s.requires_grad_()
    with use_backend("cpp"):
        x_next, sq_sum = rollout_step(x, s, t, cu, step, loss)
        (sq_sum * weights).sum().backward()
    rtol, atol = ROLLOUT_TOL[dtype]
    torch.testing.assert_close(x_next, ref_x, rtol=rtol, atol=atol)
    torch.testing.assert_close(sq_sum.detach(), ref_sq.detach(), rtol=SQ_RTOL, atol=0.0)
    assert s.grad.dtype == dtype
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------- ema_update
SIZES = [(1,), (3,), (1000,), (8193,), (7, 123), (2, 3, 5)]   # 8193: two chunks, the second of one element


@pytest.mark.parametrize("decay", [0.9, 0.9999, 0.25])       # 0.25: torch.lerp's large-weight branch
@pytest.mark.parametrize("lowp_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_ema_update_bit_equals_foreach_lerp(decay, lowp_dtype, aligned):
    g = gen(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    teacher = [torch.randn(sh, generator=g) for sh in SIZES]
    student = [(t + torch.randn(sh, generator=g)).to(dtypes[i % 3]) for i, (t, sh) in enumerate(zip(teacher, SIZES))]
    if not aligned:
        teacher, student = [misaligned(t) for t in teacher], [misaligned(s) for s in student]
    lowp = [] if lowp_dtype is None else [torch.full(sh, float("nan"), dtype=lowp_dtype) for sh in SIZES]
    want = [t.clone() for t in teacher]
    R.ema_update_ref(want, student, decay)
    C.ema_update(teacher, student, lowp, decay)
    for got, w in zip(teacher, want):
        torch.testing.assert_close(got, w, rtol=0.0, atol=0.0)
    for low, w in zip(lowp, want):
        torch.testing.assert_close(low, w.to(lowp_dtype), rtol=0.0, atol=0.0)


def test_ema_update_functional_through_cpp_backend():
    g = gen(4)
    teacher = [torch.randn(sh, generator=g) for sh in SIZES]
    student = [(t + 1e-3 * torch.randn(t.shape, generator=g)).bfloat16() for t in teacher]
    lowp = [torch.full(t.shape, float("nan"), dtype=torch.bfloat16) for t in teacher]
    want = [t.clone() for t in teacher]
    with use_backend("cpp"):
        for _ in range(3):
            ema_update(teacher, student, 0.9999, lowp)
            R.ema_update_ref(want, student, 0.9999)
    for got, w, low in zip(teacher, want, lowp):
        torch.testing.assert_close(got, w, rtol=0.0, atol=0.0)
        torch.testing.assert_close(low, w.bfloat16(), rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------- epilogues
def sample_index(T, B, g, sorted_):
    if B == 1:
        return None
    idx = torch.sort(torch.randint(0, B, (T,), generator=g))[0]
    return idx if sorted_ else idx[torch.randperm(T, generator=g)]


def epilogue_inputs(op, T, D, B, dtype, seed, sorted_=True, strided=False):
    g = gen(seed)
    rn = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    # adaLN outputs are chunk views of one (B, 4D) projection: strided modulation rows, as in the model
    mod = rn(B, 4 * D, scale=0.5)[:, D: 2 * D]
    x = rn(T, 2 * D)[:, :D] if strided else rn(T, D)
    inp = dict(x=x, weight=1 + rn(D, scale=0.2), sample_index=sample_index(T, B, g, sorted_))
    if op == "modulated_rms_norm":
        return {**inp, "scale": mod}
    return {**inp, "a": rn(T, D, scale=3.0), "gate": mod * 2}


def fp32(d):
    return {k: v.float() if v is not None and v.is_floating_point() else v for k, v in d.items()}


def call_fwd(op, inp):
    if op == "modulated_rms_norm":
        return C.modulated_rms_norm(inp["x"], inp["weight"], inp["scale"], inp["sample_index"], EPS)
    return C.gated_residual(inp["x"], inp["a"], inp["weight"], inp["gate"], inp["sample_index"], EPS)


def call_bwd(op, dy, inp):
    if op == "modulated_rms_norm":
        return C.modulated_rms_norm_backward(dy, inp["x"], inp["weight"], inp["scale"], inp["sample_index"], EPS,
                                             True, True)
    return C.gated_residual_backward(dy, inp["a"], inp["weight"], inp["gate"], inp["sample_index"], EPS, True, True)


def ref_bwd(op, dy, inp):
    if op == "modulated_rms_norm":
        return R.modulated_rms_norm_backward_ref(dy, **inp, eps=EPS)
    return R.gated_residual_backward_ref(dy, **inp, eps=EPS)[1:]   # (da, dweight, dgate): dx is dy itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1, 48), (37, 100), (123, 48), (70, 3840)])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual"])
def test_row_epilogues_match_reference(op, B, T, D, dtype):
    inp = epilogue_inputs(op, T, D, B, dtype, seed=T + D + B, strided=T == 37)
    want = R.epilogues_ref[op][0](**fp32(inp), eps=EPS)
    out = call_fwd(op, inp)
    assert out.dtype == R.epilogues_ref[op][0](**inp, eps=EPS).dtype and out.is_contiguous()
    close(out, want, dtype, FWD_TOL, f"{op} forward")
    dy = torch.randn(T, D, generator=gen(7)).to(out.dtype)
    got = call_bwd(op, dy, inp)
    for i, (gg, wg) in enumerate(zip(got, ref_bwd(op, dy.float(), fp32(inp)))):
        assert gg.shape == wg.shape, (op, i)
        close(gg, wg, dtype, BWD_TOL, f"{op} grad {i}")


@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual"])
def test_row_epilogues_unsorted_samples_and_frozen_params(op):
    inp = epilogue_inputs(op, 50, 64, 4, torch.float32, seed=5, sorted_=False)
    close(call_fwd(op, inp), R.epilogues_ref[op][0](**inp, eps=EPS), torch.float32, FWD_TOL, op)
    dy = torch.randn(50, 64, generator=gen(8))
    want = ref_bwd(op, dy, inp)
    mod = inp["scale"] if op == "modulated_rms_norm" else inp["gate"]
    fn = C.modulated_rms_norm_backward if op == "modulated_rms_norm" else C.gated_residual_backward
    first = inp["x"] if op == "modulated_rms_norm" else inp["a"]
    d0, dw, dm = fn(dy, first, inp["weight"], mod, inp["sample_index"], EPS, False, True)
    assert dw.numel() == 0
    close(d0, want[0], torch.float32, BWD_TOL, "d input")
    close(dm, want[2], torch.float32, BWD_TOL, "d modulation")


def qk_inputs(T, hq, hk, hd, dtype, seed, fused=False):
    g = gen(seed)
    if fused:   # q and k as views of one fused projection: token and head strides that are not contiguous
        qkv = torch.randn(T, hq + 2 * hk, hd, generator=g).to(dtype)
        q, k = qkv[:, :hq], qkv[:, hq: hq + hk]
    else:
        q, k = torch.randn(T, hq, hd, generator=g).to(dtype), torch.randn(T, hk, hd, generator=g).to(dtype)
    qw, kw = (1 + 0.2 * torch.randn(hd, generator=g)).to(dtype), (1 + 0.2 * torch.randn(hd, generator=g)).to(dtype)
    angle = torch.rand(T, hd // 2, generator=g) * 6.3
    return q, k, qw, kw, angle.cos(), angle.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hq,hk,hd,fused", [(1, 3, 3, 48, False), (13, 3, 2, 100, False), (9, 2, 2, 16, True),
                                              (5, 4, 2, 128, True)])
def test_qk_norm_rope_matches_reference(T, hq, hk, hd, fused, dtype):
    q, k, qw, kw, cos, sin = qk_inputs(T, hq, hk, hd, dtype, seed=T, fused=fused)
    wq, wk = R.qk_norm_rope_ref(q.float(), k.float(), qw.float(), kw.float(), cos, sin, EPS)
    mq, mk = R.qk_norm_rope_ref(q, k, qw, kw, cos, sin, EPS)
    oq, ok = C.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert (oq.dtype, ok.dtype) == (mq.dtype, mk.dtype)
    close(oq, wq, dtype, FWD_TOL, "q")
    close(ok, wk, dtype, FWD_TOL, "k")
    gq = torch.randn(oq.shape, generator=gen(1)).to(oq.dtype)
    gk = torch.randn(ok.shape, generator=gen(2)).to(ok.dtype)
    want = R.qk_norm_rope_backward_ref(gq.float(), gk.float(), q.float(), k.float(), qw.float(), kw.float(), cos, sin,
                                       EPS)
    got = C.qk_norm_rope_backward(gq, gk, q, k, qw, kw, cos, sin, EPS, True)
    for name, gg, wg in zip(["dq", "dk", "dq_weight", "dk_weight"], got, want):
        close(gg, wg, dtype, BWD_TOL, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_ops_fwd_bwd_through_cpp_backend(dtype):
    """The dopsd:: custom ops' autograd with the cpp backend against autograd through the fp32 reference."""
    T, D, B = 37, 96, 3
    inp = epilogue_inputs("gated_residual", T, D, B, dtype, seed=11)
    x, a, w, gate, si = inp["x"], inp["a"], inp["weight"], inp["gate"], inp["sample_index"]
    q, k, qw, kw, cos, sin = qk_inputs(T, 2, 2, 48, dtype, seed=12)
    leaves = [t.clone().requires_grad_() for t in (x, a, w, gate, q, k, qw, kw)]
    ref_leaves = [t.float().requires_grad_() for t in (x, a, w, gate, q, k, qw, kw)]

    def chain(x, a, w, gate, q, k, qw, kw, mrn, gr, qkr):
        h = gr(mrn(x, w, gate, si, EPS), a, w, gate, si, EPS)
        oq, ok = qkr(q, k, qw, kw, cos, sin, EPS)
        return h, oq, ok

    with use_backend("cpp"):
        outs = chain(*leaves, modulated_rms_norm, gated_residual, qk_norm_rope)
        dys = [torch.randn(o.shape, generator=gen(13)).to(o.dtype) for o in outs]
        got = torch.autograd.grad(outs, leaves, dys)
    want_outs = chain(*ref_leaves, R.modulated_rms_norm_ref, R.gated_residual_ref, R.qk_norm_rope_ref)
    want = torch.autograd.grad(want_outs, ref_leaves, [d.float() for d in dys])
    for o, wo in zip(outs, want_outs):
        close(o, wo, dtype, FWD_TOL, "forward")
    for i, (gg, wg, src) in enumerate(zip(got, want, leaves)):
        assert gg.dtype == src.dtype and gg.shape == src.shape, i
        close(gg, wg, dtype, BWD_TOL, f"grad {i}")


# ------------------------------------------------------------------------------------ dtype conversions (common.h)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value_round_trips_like_torch(dtype):
    """All 65536 bit patterns through fp32 and back (x_next = x + 0 * out_s), bit for bit with the reference."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    s, t = torch.ones(x.numel(), dtype=dtype), torch.zeros(x.numel(), dtype=dtype)
    cu = torch.tensor([0, x.numel()], dtype=torch.int32)
    got, _, _ = C.rollout_step(x, s, t, cu, torch.zeros(1), torch.ones(1), False)
    want, _ = R.rollout_step_ref(x, s, t, cu, torch.zeros(1), torch.ones(1))
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_rounds_to_nearest_even_like_torch(dtype):
    """fp32 -> 16 bits on ties, subnormals, overflow and NaN (the low-precision EMA copy of an unchanged master; an
    infinite master would turn NaN in the lerp: inf comes back through the round-trip test above)."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("nan"), info.max, -info.max, info.tiny,
                            info.tiny * 0.5, info.tiny * 2**-9, info.tiny * 2**-11, 65519.0, 65520.0, 65536.0, 1e30,
                            1e-30, 2**-25, 2**-24, 1.5 * 2**-24, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8])
    bits = torch.randint(-(2**31), 2**31 - 1, (100_000,), generator=gen(9), dtype=torch.int64).to(torch.int32)
    # random fp32 bit patterns, and exact ties: midpoints of neighbouring 16-bit values (exact in fp32)
    top = 0x7BFF if dtype == torch.float16 else 0x7F7F   # bit pattern of the largest finite value
    lo = torch.randint(0, top, (10_000,), generator=gen(10), dtype=torch.int32).to(torch.int16)
    below, above = lo.view(dtype).float(), (lo + 1).view(dtype).float()
    ties = below + (above - below) / 2   # (below + above) / 2 would overflow near bf16's max
    teacher = torch.cat([special, bits.view(torch.float32), ties, -ties])
    low = torch.empty(teacher.shape, dtype=dtype)
    C.ema_update([teacher.clone()], [teacher.clone()], [low], 1.0)   # weight 0: the master keeps its value
    torch.testing.assert_close(low, teacher.to(dtype), rtol=0.0, atol=0.0, equal_nan=True)
