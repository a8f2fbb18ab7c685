"""Packed double forward: teacher rows (c_t, teacher adapter) and student rows (c_s, student adapter) in ONE
Z-Image forward equal the two per-role forwards, in outputs and in the student's gradients."""
import pytest
import torch

from dopsd_fast.method.roles import FullRoles, LoRARoles
from dopsd_fast.models.checkpointing import CheckpointPlan
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.ops._dispatch import use_backend

from test_z_image import randomize_  # noqa: E402  (same folder)

TINY = ZImageConfig(in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                    axes_dims=(8, 12, 12), axes_lens=(256, 32, 32))
TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
# (rtol, atol as a fraction of the largest magnitude). fp32: the same per-row maths, only the GEMMs' row count
# and the order of the adapter-gradient row sums differ (elements that cancel to ~1e-3 of the largest get an
# atol of 1e-5 of it in gradients). bf16: both paths round the same ops to bf16, but the fused LoRA op rounds its
# product once where LoRALinear.forward rounds twice, so a few bf16 ulps (2^-8) per layer.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 3e-2)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}


def make_roles(dtype=torch.float32, checkpointing=False, targets=TARGETS):
    torch.manual_seed(0)
    model = ZImageTransformer(TINY)
    randomize_(model)
    return distinct_roles(model, targets, dtype, checkpointing)


def distinct_roles(model, targets, dtype, checkpointing):
    """LoRA roles on ``model`` whose student and teacher adapters differ (shared with the klein packed test)."""
    roles = LoRARoles(model, targets, rank=3, alpha=5.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # student and teacher differ, and B != 0 so every adapter gradient is non-zero
        for p in list(roles.trainable.values()) + roles.ema.teacher:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.checkpointing = CheckpointPlan("full" if checkpointing else "none")
    return roles, model.to(dtype)


def inputs(dtype):
    """3 samples, odd image sizes (12, 16, 6 tokens) and caption lengths (5, 40, 33 rows -> 32, 64, 64 padded)."""
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(4, 1, h, w, generator=g).to(dtype) for h, w in [(6, 8), (8, 8), (4, 6)]]
    c_s = [torch.randn(n, 16, generator=g).to(dtype) for n in (5, 40, 33)]
    c_t = [torch.randn(n, 16, generator=g).to(dtype) for n in (9, 31, 70)]
    weights = [torch.rand(xi.shape, generator=g) for xi in x]
    return x, torch.tensor([0.1, 0.1, 0.1]), c_s, c_t, weights


def run(roles, dtype, packed, backend="reference"):
    """Outputs and the student adapter's grads (context refiner included) after one weighted MSE backward."""
    x, t, c_s, c_t, weights = inputs(dtype)
    for p in roles.trainable.values():
        p.grad = None
    with use_backend(backend):
        ctx_t = roles.context("teacher", c_t)
        ctx_s = roles.context("student", c_s)
        out_t, out_s = roles.teacher_and_student(x, t, ctx_t, ctx_s, packed=packed)
        assert not any(o.requires_grad for o in out_t), "teacher outputs are stopped"
        loss = sum((w * (s.float() - o.float()) ** 2).mean() for w, s, o in zip(weights, out_s, out_t))
        loss.backward()
    assert all(p.grad is None for p in roles.ema.teacher), "the teacher adapter gets no gradient"
    grads = {k: p.grad.float() for k, p in roles.trainable.items()}
    return [o.float() for o in out_t], [o.detach().float() for o in out_s], grads


def assert_close(got, want, dtype, what, table=TOL):
    rtol, atol = table[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * want.abs().max().item(), msg=lambda m: f"{what}: {m}")


def assert_same(packed, separate, dtype):
    (pt, ps, pg), (st, ss, sg) = packed, separate
    for i, (a, b) in enumerate(zip(pt, st)):
        assert_close(a, b, dtype, f"teacher output {i}")
    for i, (a, b) in enumerate(zip(ps, ss)):
        assert_close(a, b, dtype, f"student output {i}")
    assert set(pg) == set(sg)
    for name, g in sg.items():
        assert g.abs().sum() > 0, name
        assert_close(pg[name], g, dtype, name, GRAD_TOL)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_two_forwards(dtype, checkpointing):
    roles, _ = make_roles(dtype, checkpointing)
    assert_same(run(roles, dtype, packed=True), run(roles, dtype, packed=False), dtype)


@pytest.mark.fused
def test_packed_equals_two_forwards_on_triton_ops():
    """The fused multi-adapter LoRA GEMM and varlen attention (Triton interpreter) against the same two forwards
    (checkpointing is covered above: under the interpreter its recompute only doubles the time)."""
    roles, _ = make_roles(torch.float32)
    # the Triton path accumulates in another order than the reference: fp32 rounding, ~1e-6 relative
    rtol, atol = 1e-4, 1e-5
    (pt, ps, pg), (st, ss, sg) = run(roles, torch.float32, True, "triton"), run(roles, torch.float32, False, "reference")
    for a, b in zip(pt + ps, st + ss):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * b.abs().max().item())
    for name, g in sg.items():
        torch.testing.assert_close(pg[name], g, rtol=rtol, atol=atol * g.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_every_linear_as_target():
    """LoRA on every linear: the embedders and final layer (their own stages' rows) and the per-sample linears
    (time embedding, adaLN: B rows, not tokens), which take one row per sample from the plan."""
    roles, _ = make_roles(targets=TARGETS + ["adaLN_modulation.0", "all_x_embedder.2-1", "all_final_layer.2-1.linear",
                                             "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"])
    assert_same(run(roles, torch.float32, packed=True), run(roles, torch.float32, packed=False), torch.float32)


def test_full_roles_refuse_packing():
    model = ZImageTransformer(TINY)
    roles = FullRoles(model)
    x, t, c_s, c_t, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match="needs LoRA roles"):
        roles.teacher_and_student(x, t, roles.context("teacher", c_t), roles.context("student", c_s), packed=True)


def test_sample_adapters_need_a_context():
    _, model = make_roles()
    x, t, c_s, _, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match="needs context="):
        model(x, t, cap_feats=c_s, sample_adapters=["student"] * 3)
