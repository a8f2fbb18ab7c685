"""GPU check of the extension's CUDA kernels: cpp (CUDA) vs Triton vs the PyTorch reference, per op, at model sizes.

Skipped without a GPU or when dopsd_fast._C was built without CUDA. Run it with TRITON_INTERPRET=0 on a GPU machine
(tests/conftest.py defaults the interpreter on). Tolerances: tests/csrc/test_cpu_twins.py's tables.
"""
import pytest
import torch

import dopsd_fast.ops.reference as R
from dopsd_fast.ops._dispatch import native_available, use_backend
from dopsd_fast.ops.ema_update import ema_update
from dopsd_fast.ops.epilogues import gated_residual, modulated_rms_norm, qk_norm_rope
from dopsd_fast.ops.rollout_step import rollout_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not native_available(cuda=True),
                                reason="needs a GPU and dopsd_fast._C built with CUDA")
from test_cpu_twins import BWD_TOL, EPS, FWD_TOL, ROLLOUT_TOL, SQ_RTOL, close  # noqa: E402

DEV = "cuda"
BACKENDS = ["cpp", "triton"]


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[262144, 262144], [3, 1001, 0, 524291]], ids=["z_image_b2", "odd"])
def test_rollout_step(backend, dtype, lengths):
    g = gen(0)
    total, batch = sum(lengths), len(lengths)
    x, s, t = (torch.randn(total, generator=g, device=DEV).to(dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    step, loss = torch.rand(batch, device=DEV, generator=g), torch.rand(batch, device=DEV, generator=g) + 0.2
    weights = torch.randn(batch, device=DEV, generator=g)
    s_ref = s.clone().requires_grad_()
    ref_x, ref_sq = R.rollout_step_ref(x, s_ref, t, cu, step, loss)
    (ref_sq * weights).sum().backward()
    s.requires_grad_()
    with use_backend(backend):
        x_next, sq_sum = rollout_step(x, s, t, cu, step, loss)
        (sq_sum * weights).sum().backward()
    rtol, atol = ROLLOUT_TOL[dtype]
    torch.testing.assert_close(x_next, ref_x, rtol=rtol, atol=atol)
    seg = torch.repeat_interleave(torch.arange(batch, device=DEV), torch.tensor(lengths, device=DEV))
    d = loss.double()[seg] * (s.detach().double() - t.double())
    want_sq = torch.zeros(batch, dtype=torch.float64, device=DEV).index_add(0, seg, d * d).float()
    torch.testing.assert_close(sq_sum.detach(), want_sq, rtol=SQ_RTOL * 10, atol=0.0)  # 500k-term sums
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [0.9999, 0.25])
def test_ema_update(backend, decay):
    g = gen(1)
    sizes = [(3840, 3840), (7,), (8193,), (3840,), (11, 13)]
    teacher = [torch.randn(sh, generator=g, device=DEV) for sh in sizes]
    student = [(t + torch.randn(t.shape, generator=g, device=DEV)).to([torch.bfloat16, torch.float32][i % 2])
               for i, t in enumerate(teacher)]
    lowp = [torch.full(t.shape, float("nan"), dtype=torch.bfloat16, device=DEV) for t in teacher]
    want = [t.clone() for t in teacher]
    R.ema_update_ref(want, student, decay)
    with use_backend(backend):
        ema_update(teacher, student, decay, lowp)
    for got, w, low in zip(teacher, want, lowp):
        torch.testing.assert_close(got, w, rtol=0.0, atol=0.0)
        torch.testing.assert_close(low, w.bfloat16(), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,B", [(2 * 4096 + 77, 3840, 2), (37, 100, 3), (123, 48, 1)])
def test_row_epilogues(backend, dtype, T, D, B):
    g = gen(T + D)
    x = torch.randn(T, D, generator=g, device=DEV).to(dtype)
    a = (3 * torch.randn(T, D, generator=g, device=DEV)).to(dtype)
    w = (1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    mod = (0.5 * torch.randn(B, 4 * D, generator=g, device=DEV)).to(dtype)
    scale, gate = mod[:, :D], mod[:, D: 2 * D]
    si = None if B == 1 else torch.sort(torch.randint(0, B, (T,), generator=g, device=DEV))[0]
    leaves = [v.clone().requires_grad_() for v in (x, a, w, scale, gate)]
    ref_leaves = [v.float().requires_grad_() for v in (x, a, w, scale, gate)]

    def chain(x, a, w, scale, gate, mrn, gr):
        return gr(mrn(x, w, scale, si, EPS), a, w, gate, si, EPS)

    with use_backend(backend):
        out = chain(*leaves, modulated_rms_norm, gated_residual)
        dy = torch.randn(out.shape, generator=g, device=DEV).to(out.dtype)
        got = torch.autograd.grad(out, leaves, dy)
    want = chain(*ref_leaves, R.modulated_rms_norm_ref, R.gated_residual_ref)
    want_g = torch.autograd.grad(want, ref_leaves, dy.float())
    close(out, want, dtype, FWD_TOL, "forward")
    bwd = {torch.float32: (1e-3, 1e-3), torch.bfloat16: BWD_TOL[torch.bfloat16]}  # dweight sums over 8k rows
    for name, gg, wg in zip(["x", "a", "weight", "scale", "gate"], got, want_g):
        if dtype == torch.bfloat16 and name in ("weight", "scale", "gate"):
            # Sums over thousands of rows whose terms carry the bf16 rounding of the intermediate (the chain's
            # normed x is stored in bf16, the fp32 reference's is not): the error grows like sqrt(rows) and does
            # not shrink where a sum cancels to near 0 (elementwise rtol fails there: seen on an H200, where
            # triton and cpp gave the same values), so these are compared normwise.
            err = ((gg.float() - wg).norm() / wg.norm()).item()
            assert err < 1e-2, f"{name}: normwise relative error {err:.2e} (bf16, {T} rows)"
            continue
        close(gg, wg, dtype, bwd, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hd", [(4096 + 3, 128), (13, 100)])
def test_qk_norm_rope(backend, dtype, T, hd):
    g = gen(T)
    qkv = torch.randn(T, 30 + 2 * 10, hd, generator=g, device=DEV).to(dtype)   # fused projection views
    q, k = qkv[:, :30], qkv[:, 30:40]
    qw, kw = ((1 + 0.2 * torch.randn(hd, generator=g, device=DEV)).to(dtype) for _ in range(2))
    angle = torch.rand(T, hd // 2, generator=g, device=DEV) * 6.3
    cos, sin = angle.cos(), angle.sin()
    leaves = [v.clone().requires_grad_() for v in (q, k, qw, kw)]
    ref_leaves = [v.float().requires_grad_() for v in (q, k, qw, kw)]
    with use_backend(backend):
        oq, ok = qk_norm_rope(*leaves, cos, sin, EPS)
        gq, gk = (torch.randn(o.shape, generator=g, device=DEV).to(o.dtype) for o in (oq, ok))
        got = torch.autograd.grad((oq, ok), leaves, (gq, gk))
    wq, wk = R.qk_norm_rope_ref(*ref_leaves, cos, sin, EPS)
    want = torch.autograd.grad((wq, wk), ref_leaves, (gq.float(), gk.float()))
    close(oq, wq, dtype, FWD_TOL, "q")
    close(ok, wk, dtype, FWD_TOL, "k")
    bwd = {torch.float32: (1e-3, 1e-3), torch.bfloat16: BWD_TOL[torch.bfloat16]}
    for name, gg, wg in zip(["q", "k", "q_weight", "k_weight"], got, want):
        close(gg, wg, dtype, bwd, name)
