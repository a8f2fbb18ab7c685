"""rollout_step: launcher, custom op (fwd + bwd), functional, torch.compile, and the method's loss / Euler step."""
import pytest
import torch

from dopsd_fast._kernels import rollout_step as _k
from dopsd_fast.method.divergence import flat, rollout_loss
from dopsd_fast.method.schedule import FlowConvention, Z_IMAGE
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.reference import rollout_step_grad_ref, rollout_step_ref
from dopsd_fast.ops.rollout_step import rollout_coefs, rollout_step

KLEIN = FlowConvention(sign=-1, time_is_sigma=True)

# (dtype, rtol, atol) for x_next and d/d out_s, judged against the reference (fp32 math on the same inputs, one
# rounding to dtype): fp32 allows a fused multiply-add on GPU; bf16/fp16 allow one ulp of the output dtype.
# sq_sum is fp32 in every case; only the summation order differs. Its terms are positive (no cancellation), so two
# orders of n <= 4099 terms differ by a few tens of fp32 ulps: 2.4e-6 (40 ulps) was seen on an H200 (block tree vs
# torch's reduction) where the interpreter stays under 2e-6; rtol 1e-5 (~170 ulps).
TOLS = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-7, 1e-6), torch.float16: (2**-10, 1e-6)}
SQ_RTOL = 1e-5
LENGTHS = [[4099], [1, 7, 1000], [1, 7, 1000, 4099]]


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make(lengths, dtype, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    total, batch = sum(lengths), len(lengths)
    x, s, t = (torch.randn(total, generator=g).to(dtype) for _ in range(3))
    step = torch.rand(batch, generator=g) * 0.5 + 0.05      # sign * (sigma - sigma_next), random per sample
    loss = (torch.rand(batch, generator=g) + 0.2) * torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0)
    return x, s, t, cu_of(lengths), step, loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("launch", [{}, {"block": 128, "programs": 3}], ids=["default", "multi_program"])
def test_launcher_matches_reference(device, dtype, lengths, launch):
    x, s, t, cu, step, loss = make(lengths, dtype)
    total, batch = x.numel(), len(lengths)
    out = torch.full_like(x, float("nan"))
    sq = torch.full((batch,), float("nan"))
    grad = torch.full((total,), float("nan"))
    x_next, sq_sum, g = _k.rollout_step_fwd(x, s, t, cu, step, loss, compute_grad=True, out=out, sq_sum=sq,
                                            grad=grad, **launch)
    assert x_next is out and sq_sum is sq and g is grad
    ref_x, ref_sq = rollout_step_ref(x, s, t, cu, step, loss)
    rtol, atol = TOLS[dtype]
    torch.testing.assert_close(x_next, ref_x, rtol=rtol, atol=atol)
    torch.testing.assert_close(sq_sum, ref_sq, rtol=SQ_RTOL, atol=0.0)
    torch.testing.assert_close(g, rollout_step_grad_ref(s, t, cu, loss), rtol=1e-6, atol=1e-6)

    gss = torch.randn(batch)
    res = torch.full_like(s, float("nan"))
    assert _k.rollout_step_bwd(g, cu, gss, dtype, out=res, **launch) is res
    seg = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
    torch.testing.assert_close(res, (g * gss[seg]).to(dtype), rtol=rtol, atol=atol)


def test_launcher_empty_segment_and_no_grad(device):
    x, s, t, cu, step, loss = make([5, 0, 9], torch.float32)
    x_next, sq_sum, g = _k.rollout_step_fwd(x, s, t, cu, step, loss, compute_grad=False)
    assert g is None and sq_sum[1].item() == 0.0
    ref_x, ref_sq = rollout_step_ref(x, s, t, cu, step, loss)
    torch.testing.assert_close(x_next, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sq_sum, ref_sq, rtol=SQ_RTOL, atol=0.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1000], [1, 7, 4099]], ids=str)
def test_op_forward_backward_matches_reference_autograd(device, backend, dtype, lengths):
    x, s, t, cu, step, loss = make(lengths, dtype, seed=1)
    weights = torch.randn(len(lengths))                   # makes grad_sq_sum differ per sample
    s_ref = s.clone().requires_grad_()
    ref_x, ref_sq = rollout_step_ref(x, s_ref, t, cu, step, loss)
    (ref_sq * weights).sum().backward()

    s.requires_grad_()
    with use_backend(backend):
        x_next, sq_sum = rollout_step(x, s, t, cu, step, loss)
        assert not x_next.requires_grad and sq_sum.requires_grad
        (sq_sum * weights).sum().backward()
    rtol, atol = TOLS[dtype]
    torch.testing.assert_close(x_next, ref_x, rtol=rtol, atol=atol)
    torch.testing.assert_close(sq_sum.detach(), ref_sq.detach(), rtol=SQ_RTOL, atol=0.0)
    assert s.grad.dtype == dtype
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_without_grad(device, backend):
    x, s, t, cu, step, loss = make([7, 1000], torch.float32)
    with use_backend(backend), torch.no_grad():
        x_next, sq_sum = rollout_step(x, s.requires_grad_(), t, cu, step, loss)
    ref_x, ref_sq = rollout_step_ref(x, s, t, cu, step, loss)
    assert not sq_sum.requires_grad
    torch.testing.assert_close(x_next, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sq_sum, ref_sq.detach(), rtol=SQ_RTOL, atol=0.0)


@pytest.mark.parametrize("flow", [Z_IMAGE, KLEIN], ids=["z_image", "klein"])
@pytest.mark.parametrize("kind", ["x0", "velocity"])
def test_reproduces_method_loss_and_euler(device, flow, kind):
    """sq_sum.sum() / total == divergence.rollout_loss and x_next == FlowConvention.euler, sample by sample."""
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    shapes = [(4, 3, 5), (4, 6, 7), (4, 1, 3)]
    x, s, t = ([torch.randn(sh, generator=g) for sh in shapes] for _ in range(3))
    s = [si.requires_grad_() for si in s]
    sigma, sigma_next = 0.75, 0.5
    want = rollout_loss(flow, x, s, t, sigma, kind)
    want.backward()
    want_grads = [si.grad.clone() for si in s]

    cu = cu_of([xi.numel() for xi in x])
    step, loss_coef = rollout_coefs(flow.sign, sigma, sigma_next, kind, len(shapes))
    s_flat = flat(s).detach().requires_grad_()
    x_next, sq_sum = rollout_step(flat(x), s_flat, flat(t), cu, step, loss_coef)
    got = sq_sum.sum() / s_flat.numel()
    got.backward()
    # the x0 loss in the released form rounds x0_s and x0_t first: ~1e-7 relative per element in fp32
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(s_flat.grad, flat(want_grads), rtol=1e-5, atol=1e-9)
    want_next = flat([flow.euler(xi, si.detach(), sigma, sigma_next) for xi, si in zip(x, s)])
    torch.testing.assert_close(x_next, want_next, rtol=1e-6, atol=1e-6)


def test_rollout_coefs():
    step, loss = rollout_coefs(-1, torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.0]), "x0", 2)
    torch.testing.assert_close(step, torch.tensor([-0.1, -0.5]))
    torch.testing.assert_close(loss, torch.tensor([-1.0, -0.5]))
    assert torch.equal(rollout_coefs(1, 0.75, 0.5, "velocity", 3)[1], torch.ones(3))
    with pytest.raises(ValueError):
        rollout_coefs(1, 0.75, 0.5, "kl", 3)


def test_torch_compile_matches_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, s, t, cu, step, loss = make([7, 1000], torch.float32, seed=3)

    def f(x, s, t, cu, step, loss):
        x_next, sq_sum = rollout_step(x, s, t, cu, step, loss)
        return x_next * 2.0, sq_sum.sum() / x.numel()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        si = s.clone().requires_grad_()
        x_next, loss_value = fn(x, si, t, cu, step, loss)
        loss_value.backward()
        results.append((x_next, loss_value.detach(), si.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_opcheck():
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of both custom ops."""
    x, s, t, cu, step, loss = make([7, 100], torch.float32, seed=4)
    torch.library.opcheck(torch.ops.dopsd.rollout_step.default, (x, s.requires_grad_(), t, cu, step, loss, True))
    torch.library.opcheck(torch.ops.dopsd.rollout_step_backward.default,
                          (torch.randn(107), cu, torch.randn(2), torch.bfloat16))
