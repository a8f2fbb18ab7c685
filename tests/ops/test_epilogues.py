"""Block epilogues (modulated RMSNorm, gated residual, qk-norm + RoPE, modulated LayerNorm) at every tier.

Oracle: dopsd_fast/ops/reference.py, itself checked against z_image.py's ZImageBlock bit for bit. Kernel results are
judged against the reference evaluated in fp32 on the same (rounded) inputs. The Triton kernels run under
TRITON_INTERPRET=1 (tests/conftest.py): tensors stay small, tiles and program counts are forced small so the
per-sample accumulation crosses tile and program boundaries.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dopsd_fast.models.z_image as z_image_module
import dopsd_fast.ops.reference as R
from dopsd_fast._kernels import epilogues as K
from dopsd_fast.models.z_image import PackedSequence, ZImageBlock, ZImageConfig, rope_cos_sin
from dopsd_fast.ops.reference import rope_ref as apply_rope
from dopsd_fast.nn.epilogues import GatedResidual, ModulatedLayerNorm, ModulatedRMSNorm, QKNormRoPE
from dopsd_fast.ops._dispatch import native_available, use_backend
from dopsd_fast.ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope

# (dtype, rtol, atol) vs the fp32 reference on the same inputs. fp32: summation order only. bf16: one rounding of
# an O(1..5) result (2^-8 relative) in the kernel; the model's own bf16 chain rounds 3-4 times.
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2)}
# Gradients: dx as above; dweight / dscale are fp32 sums over up to ~120 rows, then cast to the input dtype.
BWD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2)}
EPS = 1e-5
SHAPES = [(1, 48), (37, 100), (123, 48)]  # (tokens, D): odd counts, non-powers of two, one row


def _gen(seed):
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


def _sample_index(T, B, g, sorted_=True):
    """int64 (T,) sample ids in [0, B): packed (non-decreasing, every sample present when T >= B) or shuffled."""
    if B == 1:
        return None
    cuts = torch.sort(torch.randperm(max(T - 1, 1), generator=g)[: B - 1] + 1)[0].tolist() if T >= B else []
    bounds = [0, *cuts, T]
    idx = torch.cat([torch.full((b - a,), i, dtype=torch.int64) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    return idx if sorted_ else idx[torch.randperm(T, generator=g)]


def _inputs(op, T, D, B, dtype, seed=0, sorted_=True):
    """Random inputs of one op (never zeros / ones) and its launcher-friendly pieces."""
    g = _gen(seed)
    rn = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    si = _sample_index(T, B, g, sorted_)
    if op == "modulated_rms_norm":
        return dict(x=rn(T, D), weight=1 + rn(D, scale=0.2), scale=rn(B, D, scale=0.5), sample_index=si)
    if op == "gated_residual":
        return dict(x=rn(T, D), a=rn(T, D, scale=3.0), weight=1 + rn(D, scale=0.2), gate=rn(B, D), sample_index=si)
    if op == "modulated_layer_norm":
        return dict(x=rn(T, D, scale=2.0) + 0.5, shift=rn(B, D, scale=0.5), scale=rn(B, D, scale=0.5), sample_index=si)
    raise ValueError(op)


def _fp32(d):
    return {k: v.float() if v is not None and v.is_floating_point() else v for k, v in d.items()}


def _close(got, want, dtype, table, what=""):
    rtol, atol = table[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _nan_like(t, dtype=None):
    return torch.full_like(t, float("nan"), dtype=dtype or t.dtype)


# --------------------------------------------------------------------- the reference is the model's maths
@pytest.fixture
def pure_attention(monkeypatch):
    """The model's attention through the pure-PyTorch reference (plain autograd), whatever backend is forced:
    these tests are about the epilogues, not about packed_attention's kernels."""
    monkeypatch.setattr(z_image_module, "packed_attention", R.packed_attention_ref)


def _tiny_block(dtype, seed=0):
    torch.manual_seed(seed)
    cfg = ZImageConfig(dim=48, n_heads=2, n_kv_heads=2, axes_dims=(8, 8, 8), axes_lens=(64, 64, 64))
    block = ZImageBlock(cfg, modulated=True)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:  # RMSNorm weights start at 1: make them distinct
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return block.to(dtype), cfg


def _block_inputs(cfg, lengths, dtype, seed=1):
    g = _gen(seed)
    T = sum(lengths)
    positions = torch.randint(0, 40, (T, 3), generator=g)
    cos, sin = rope_cos_sin(positions, cfg.axes_dims, cfg.rope_theta)
    seq = PackedSequence.build(lengths, cos, sin)
    x = torch.randn(T, cfg.dim, generator=g).to(dtype)
    t_emb = torch.randn(len(lengths), 48, generator=g).to(dtype)
    return x, seq, t_emb


def _block_forward(block, x, seq, t_emb, mrn, gr, qkr):
    """ZImageBlock.forward (modulated) written with the epilogue ops."""
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(t_emb).chunk(4, dim=-1)  # (B, D) views
    si, attn, eps = seq.sample_index, block.attention, block.attention_norm1.eps
    h = mrn(x, block.attention_norm1.weight, scale_msa, si, eps)
    q, k, v = (proj(h).unflatten(-1, (attn.n_heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q, k = qkr(q, k, attn.norm_q.weight, attn.norm_k.weight, seq.rope_cos, seq.rope_sin, attn.norm_q.eps)
    a = attn.to_out[0](R.packed_attention_ref(q, k, v, seq.cu_seqlens, seq.max_seqlen).flatten(1))
    x = gr(x, a, block.attention_norm2.weight, gate_msa, si, eps)
    return gr(x, block.feed_forward(mrn(x, block.ffn_norm1.weight, scale_mlp, si, eps)), block.ffn_norm2.weight,
              gate_mlp, si, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[37], [5, 17, 11]])
@use_backend("reference")   # the model calls these ops: compare it on the reference path, bit for bit
def test_reference_equals_z_image_block(dtype, lengths, pure_attention):
    block, cfg = _tiny_block(dtype)
    x, seq, t_emb = _block_inputs(cfg, lengths, dtype)
    si = seq.sample_index
    mod = block.adaLN_modulation(t_emb)
    scale, gate = mod[:, : cfg.dim], mod[:, cfg.dim: 2 * cfg.dim]
    per = mod if mod.shape[0] == 1 else mod[si]
    with torch.no_grad():
        # each piece, bit for bit
        assert torch.equal(R.modulated_rms_norm_ref(x, block.attention_norm1.weight, scale, si, EPS),
                           block.attention_norm1(x) * (1.0 + per[:, : cfg.dim]))
        a = torch.randn_like(x)
        assert torch.equal(R.gated_residual_ref(x, a, block.attention_norm2.weight, gate, si, EPS),
                           x + per[:, cfg.dim: 2 * cfg.dim].tanh() * block.attention_norm2(a))
        q = torch.randn(x.shape[0], 2, cfg.head_dim).to(dtype)
        k = torch.randn_like(q)
        nq, nk = block.attention.norm_q, block.attention.norm_k
        rq, rk = R.qk_norm_rope_ref(q, k, nq.weight, nk.weight, seq.rope_cos, seq.rope_sin, nq.eps)
        assert torch.equal(rq, apply_rope(nq(q), seq.rope_cos, seq.rope_sin))
        assert torch.equal(rk, apply_rope(nk(k), seq.rope_cos, seq.rope_sin))
        # FinalLayer: F.layer_norm(x, eps=1e-6) * (1 + scale)
        assert torch.equal(R.modulated_layer_norm_ref(x, None, scale, si, 1e-6),
                           F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1.0 + per[:, : cfg.dim]))
        # the whole block
        want = block(x, seq, t_emb)
        got = _block_forward(block, x, seq, t_emb, R.modulated_rms_norm_ref, R.gated_residual_ref, R.qk_norm_rope_ref)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_block_with_ops_matches_model_fwd_bwd(device, backend, pure_attention):
    """The functional ops wired into ZImageBlock: same output and same gradients (x, norms, adaLN, projections)."""
    block, cfg = _tiny_block(torch.float32)
    x, seq, t_emb = _block_inputs(cfg, [5, 17, 11], torch.float32)
    x.requires_grad_(True)
    params = [p for _, p in block.named_parameters()]
    dy = torch.randn(x.shape, generator=_gen(3))
    want = block(x, seq, t_emb)
    want_grads = torch.autograd.grad(want, [x, *params], dy)
    with use_backend(backend):
        got = _block_forward(block, x, seq, t_emb, modulated_rms_norm, gated_residual, qk_norm_rope)
        got_grads = torch.autograd.grad(got, [x, *params], dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, _), gg, wg in zip([("x", None), *block.named_parameters()], got_grads, want_grads):
        torch.testing.assert_close(gg, wg, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------- explicit backward refs = autograd
@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
@pytest.mark.parametrize("B", [1, 3])
def test_backward_refs_equal_autograd(op, B):
    inp = _inputs(op, 37, 100, B, torch.float32, seed=4)
    fwd, bwd = R.epilogues_ref[op]
    diff = [k for k, v in inp.items() if v is not None and v.is_floating_point()]
    leaves = {k: inp[k].clone().requires_grad_(True) for k in diff}
    out = fwd(**{**inp, **leaves}, eps=EPS)
    dy = torch.randn(out.shape, generator=_gen(5))
    want = dict(zip(diff, torch.autograd.grad(out, [leaves[k] for k in diff], dy)))
    got = bwd(dy, **inp, eps=EPS)
    names = {"modulated_rms_norm": ["x", "weight", "scale"], "gated_residual": ["x", "a", "weight", "gate"],
             "modulated_layer_norm": ["x", "shift", "scale"]}[op]
    for name, g in zip(names, got):
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{op} d{name}: {m}")


def _qk_inputs(T, hq, hk, hd, dtype, seed=0, fused=False):
    g = _gen(seed)
    if fused:  # views of a fused (T, 3, H, hd) qkv projection: token stride 3*H*hd
        qkv = torch.randn(T, 3, hq, hd, generator=g).to(dtype)
        q, k = qkv[:, 0], qkv[:, 1]
    else:
        q, k = torch.randn(T, hq, hd, generator=g).to(dtype), (torch.randn(T, hk, hd, generator=g) * 2).to(dtype)
    ang = torch.randn(T, hd // 2, generator=g) * 3
    qw, kw = (1 + 0.2 * torch.randn(hd, generator=g)).to(dtype), (1 + 0.2 * torch.randn(hd, generator=g)).to(dtype)
    return q, k, qw, kw, ang.cos(), ang.sin()


def test_qk_backward_ref_equals_autograd():
    q, k, qw, kw, cos, sin = _qk_inputs(13, 3, 2, 48, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, qw, kw)]
    oq, ok = R.qk_norm_rope_ref(*leaves, cos, sin, EPS)
    gq, gk = torch.randn(oq.shape, generator=_gen(1)), torch.randn(ok.shape, generator=_gen(2))
    want = torch.autograd.grad((oq, ok), leaves, (gq, gk))
    for got, w in zip(R.qk_norm_rope_backward_ref(gq, gk, q, k, qw, kw, cos, sin, EPS), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- launchers vs reference
def _launch_fwd(op, inp, out=None, block_t=None):
    if op == "modulated_rms_norm":
        return K.modulated_rms_norm_fwd(inp["x"], inp["weight"], inp["scale"], inp["sample_index"], EPS, out=out,
                                        block_t=block_t)
    if op == "gated_residual":
        return K.gated_residual_fwd(inp["x"], inp["a"], inp["weight"], inp["gate"], inp["sample_index"], EPS, out=out,
                                    block_t=block_t)
    return K.modulated_layer_norm_fwd(inp["x"], inp["shift"], inp["scale"], inp["sample_index"], EPS, out=out,
                                      block_t=block_t)


def _launch_bwd(op, dy, inp, dx=None, block_t=None, num_programs=None):
    """-> grads in the backward ref's order (gated_residual: without dx)."""
    kw = dict(block_t=block_t, num_programs=num_programs)
    if op == "modulated_rms_norm":
        return K.modulated_rms_norm_bwd(dy, inp["x"], inp["weight"], inp["scale"], inp["sample_index"], EPS, dx=dx,
                                        **kw)
    if op == "gated_residual":
        return K.gated_residual_bwd(dy, inp["a"], inp["weight"], inp["gate"], inp["sample_index"], EPS, da=dx, **kw)
    dx, ds, dsh = K.modulated_layer_norm_bwd(dy, inp["x"], inp["scale"], inp["sample_index"], EPS, dx=dx, **kw)
    return dx, dsh, ds


def _ref_bwd(op, dy, inp):
    got = R.epilogues_ref[op][1](dy, **inp, eps=EPS)
    return got[1:] if op == "gated_residual" else got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", SHAPES)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
def test_launchers_match_reference(device, op, B, T, D, dtype):
    inp = _inputs(op, T, D, B, dtype, seed=T + D + B)
    want = R.epilogues_ref[op][0](**_fp32(inp), eps=EPS)
    ref_same_dtype = R.epilogues_ref[op][0](**inp, eps=EPS)  # the model's own numerics in this dtype
    out = _launch_fwd(op, inp, out=_nan_like(ref_same_dtype), block_t=16)  # poisoned; 16-row tiles
    assert out.dtype == ref_same_dtype.dtype and out.shape == (T, D)
    _close(out, want, dtype, FWD_TOL, f"{op} forward")
    if dtype != torch.float32:  # no worse than the model's bf16 chain (+ one ulp)
        err, model_err = (out.float() - want).abs().max(), (ref_same_dtype.float() - want).abs().max()
        assert err <= model_err + 2 ** -7 * want.abs().max(), (err, model_err)

    dy = torch.randn(T, D, generator=_gen(7)).to(ref_same_dtype.dtype)
    want_g = _ref_bwd(op, dy.float(), _fp32(inp))
    x_like = inp["a"] if op == "gated_residual" else inp["x"]
    got_g = _launch_bwd(op, dy, inp, dx=_nan_like(x_like), block_t=8, num_programs=3)  # 2-6 tiles per program
    for i, (gg, wg) in enumerate(zip(got_g, want_g)):
        assert gg.shape == wg.shape, (op, i)
        _close(gg, wg, dtype, BWD_TOL, f"{op} grad {i}")


@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
def test_launchers_unsorted_sample_index_and_default_tiles(device, op):
    """Shuffled sample ids take the flush path on every tile; default tiles (one tile under the interpreter)."""
    inp = _inputs(op, 123, 48, 4, torch.float32, seed=11, sorted_=False)
    dy = torch.randn(123, 48, generator=_gen(12))
    want_g = _ref_bwd(op, dy, inp)
    for kw in (dict(block_t=8, num_programs=5), dict()):
        for gg, wg in zip(_launch_bwd(op, dy, inp, **kw), want_g):
            torch.testing.assert_close(gg, wg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_launch_fwd(op, inp), R.epilogues_ref[op][0](**inp, eps=EPS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
def test_launchers_real_width(device, op):
    """D = 3840 (Z-Image) in one block, 5 tokens of 2 samples."""
    inp = _inputs(op, 5, 3840, 2, torch.bfloat16, seed=21)
    want = R.epilogues_ref[op][0](**_fp32(inp), eps=EPS)
    _close(_launch_fwd(op, inp), want, torch.bfloat16, FWD_TOL, op)
    dy = torch.randn(5, 3840, generator=_gen(22)).bfloat16()
    for gg, wg in zip(_launch_bwd(op, dy, inp), _ref_bwd(op, dy.float(), _fp32(inp))):
        _close(gg, wg, torch.bfloat16, BWD_TOL, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hq,hk,hd,fused", [(1, 3, 3, 48, False), (13, 3, 2, 100, False), (9, 2, 2, 16, True)])
def test_qk_launchers_match_reference(device, T, hq, hk, hd, fused, dtype):
    q, k, qw, kw, cos, sin = _qk_inputs(T, hq, hk, hd, dtype, seed=T, fused=fused)
    wq, wk = R.qk_norm_rope_ref(q.float(), k.float(), qw.float(), kw.float(), cos, sin, EPS)
    mq, mk = R.qk_norm_rope_ref(q, k, qw, kw, cos, sin, EPS)
    oq, ok = K.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, EPS, out_q=_nan_like(mq), out_k=_nan_like(mk), block_t=4)
    assert (oq.dtype, ok.dtype) == (mq.dtype, mk.dtype)
    _close(oq, wq, dtype, FWD_TOL, "q")
    _close(ok, wk, dtype, FWD_TOL, "k")
    gq = torch.randn(oq.shape, generator=_gen(1)).to(oq.dtype)
    gk = torch.randn(ok.shape, generator=_gen(2)).to(ok.dtype)
    want = R.qk_norm_rope_backward_ref(gq.float(), gk.float(), q.float(), k.float(), qw.float(), kw.float(), cos, sin,
                                       EPS)
    got = K.qk_norm_rope_bwd(gq, gk, q, k, qw, kw, cos, sin, EPS, dq=_nan_like(q.contiguous()),
                             dk=_nan_like(k.contiguous()), block_t=2, num_programs=3)
    for name, gg, wg in zip(["dq", "dk", "dq_weight", "dk_weight"], got, want):
        _close(gg, wg, dtype, BWD_TOL, name)


def test_qk_launcher_real_width(device):
    """Z-Image attention: 30 heads x 128, 3 tokens."""
    q, k, qw, kw, cos, sin = _qk_inputs(3, 30, 30, 128, torch.bfloat16, seed=5)
    want = R.qk_norm_rope_ref(q.float(), k.float(), qw.float(), kw.float(), cos, sin, EPS)
    for got, w in zip(K.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, EPS), want):
        _close(got, w, torch.bfloat16, FWD_TOL, "qk 30x128")


def test_launcher_edge_cases(device):
    x = torch.randn(0, 48)
    assert K.modulated_rms_norm_fwd(x, torch.randn(48), torch.randn(1, 48), None, EPS).shape == (0, 48)
    dx, dw, ds = K.modulated_rms_norm_bwd(x, x, torch.randn(48), torch.randn(2, 48), torch.zeros(0, dtype=torch.int64),
                                          EPS)
    assert dx.shape == (0, 48) and torch.equal(dw, torch.zeros(48)) and torch.equal(ds, torch.zeros(2, 48))
    with pytest.raises(ValueError, match="sample_index"):
        K.modulated_rms_norm_fwd(torch.randn(4, 8), torch.randn(8), torch.randn(2, 8), None, EPS)
    with pytest.raises(ValueError, match="MAX_D"):
        K.gated_residual_fwd(torch.randn(1, K.MAX_D + 1), torch.randn(1, K.MAX_D + 1), torch.randn(K.MAX_D + 1),
                             torch.randn(1, K.MAX_D + 1), None, EPS)
    with pytest.raises(ValueError, match="out"):
        K.modulated_layer_norm_fwd(torch.randn(4, 8), None, torch.randn(1, 8), None, EPS, out=torch.empty(4, 8).half())


# ------------------------------------------------------------------------- custom ops: forward and backward
def _call(op, inp):
    fn = {"modulated_rms_norm": modulated_rms_norm, "gated_residual": gated_residual,
          "modulated_layer_norm": modulated_layer_norm}[op]
    return fn(**inp, eps=EPS)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
def test_op_fwd_bwd_vs_autograd_through_reference(device, op, B, dtype, backend):
    inp = _inputs(op, 37, 100, B, dtype, seed=B + 40)
    diff = [k for k, v in inp.items() if v is not None and v.is_floating_point()]
    ref_leaves = {k: inp[k].float().requires_grad_(True) for k in diff}
    want = R.epilogues_ref[op][0](**{**inp, **ref_leaves}, eps=EPS)
    leaves = {k: inp[k].clone().requires_grad_(True) for k in diff}
    with use_backend(backend):
        out = _call(op, {**inp, **leaves})
        assert out.dtype == R.epilogues_ref[op][0](**inp, eps=EPS).dtype
        dy = torch.randn(out.shape, generator=_gen(9)).to(out.dtype)
        got = torch.autograd.grad(out, [leaves[k] for k in diff], dy)
    want_g = torch.autograd.grad(want, [ref_leaves[k] for k in diff], dy.float())
    _close(out, want, dtype, FWD_TOL, op)
    for name, gg, wg in zip(diff, got, want_g):
        assert gg.dtype == inp[name].dtype and gg.shape == inp[name].shape, name
        _close(gg, wg, dtype, BWD_TOL, f"{op} d{name}")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_op_fwd_bwd_vs_autograd_through_reference(device, dtype, backend):
    q, k, qw, kw, cos, sin = _qk_inputs(13, 3, 2, 100, dtype, seed=3)
    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, qw, kw)]
    wq, wk = R.qk_norm_rope_ref(*ref_leaves, cos, sin, EPS)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, qw, kw)]
    with use_backend(backend):
        oq, ok = qk_norm_rope(*leaves, cos, sin, EPS)
        gq = torch.randn(oq.shape, generator=_gen(1)).to(oq.dtype)
        gk = torch.randn(ok.shape, generator=_gen(2)).to(ok.dtype)
        got = torch.autograd.grad((oq, ok), leaves, (gq, gk))
    want = torch.autograd.grad((wq, wk), ref_leaves, (gq.float(), gk.float()))
    _close(oq, wq, dtype, FWD_TOL, "q")
    _close(ok, wk, dtype, FWD_TOL, "k")
    for name, gg, wg, src in zip(["q", "k", "q_weight", "k_weight"], got, want, (q, k, qw, kw)):
        assert gg.dtype == src.dtype, name
        _close(gg, wg, dtype, BWD_TOL, name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_frozen_weights_and_modulation_get_no_grad(device, backend):
    """LoRA training: norm weights and adaLN outputs frozen -> only the activations get gradients."""
    x = torch.randn(9, 48, requires_grad=True)
    a = torch.randn(9, 48, requires_grad=True)
    w, s, si = torch.randn(48), torch.randn(2, 48), torch.tensor([0] * 4 + [1] * 5)
    cos, sin = _qk_inputs(9, 2, 2, 24, torch.float32)[4:]
    with use_backend(backend):
        out = gated_residual(modulated_rms_norm(x, w, s, si), a, w, s, si)
        out = modulated_layer_norm(out, None, s, si)
        q, _ = qk_norm_rope(out.view(9, 2, 24), out.view(9, 2, 24).detach(), w[:24], w[24:], cos, sin)
        gx, ga = torch.autograd.grad(q.square().sum(), [x, a])
    out = R.gated_residual_ref(R.modulated_rms_norm_ref(x, w, s, si, EPS), a, w, s, si, EPS)
    out = R.modulated_layer_norm_ref(out, None, s, si, 1e-6)
    q, _ = R.qk_norm_rope_ref(out.view(9, 2, 24), out.view(9, 2, 24).detach(), w[:24], w[24:], cos, sin, EPS)
    wx, wa = torch.autograd.grad(q.square().sum(), [x, a])
    torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ga, wa, rtol=1e-4, atol=1e-4)


# Frozen in LoRA training (norm weights, adaLN outputs of frozen layers): the op's backward must not form them.
_FROZEN = {"modulated_rms_norm": ("weight", "scale"), "gated_residual": ("weight", "gate"),
           "modulated_layer_norm": ("shift", "scale")}


def _skip_unless_backend(backend, op="", cuda=False):
    if backend == "cpp" and (op == "modulated_layer_norm" or not native_available(cuda=cuda)):
        pytest.skip("no dopsd_C kernel for this op / extension not built")


def _spy_backward_ref(monkeypatch, fn):
    """Record what the reference backward returns (None where a gradient was not computed)."""
    returned = []

    def spy(*args, **kwargs):
        returned.append(fn(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(R, fn.__name__, spy)
    return returned


@pytest.mark.parametrize("backend", ["triton", "reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["modulated_rms_norm", "gated_residual", "modulated_layer_norm"])
def test_frozen_inputs_skip_their_gradients(device, op, dtype, backend, monkeypatch):
    """Frozen weight / modulation inputs: the activations' gradients are bit-identical to a run where every input
    needs one, the frozen inputs get none, and the reference backward never forms them."""
    _skip_unless_backend(backend, op, cuda=device == "cuda")
    inp = _inputs(op, 37, 100, 3, dtype, seed=21)
    diff = [k for k, v in inp.items() if v is not None and v.is_floating_point()]
    returned = _spy_backward_ref(monkeypatch, R.epilogues_ref[op][1])

    def backward(frozen):
        leaves = {k: inp[k].clone().requires_grad_(k not in frozen) for k in diff}
        with use_backend(backend):
            out = _call(op, {**inp, **leaves})
            out.backward(torch.randn(out.shape, generator=_gen(22)).to(out.dtype))
        return leaves

    full, frozen = backward(()), backward(_FROZEN[op])
    for k in diff:
        if k in _FROZEN[op]:
            assert frozen[k].grad is None, k
        else:
            torch.testing.assert_close(frozen[k].grad, full[k].grad, rtol=0, atol=0, msg=lambda m: f"d{k}: {m}")
    if backend == "reference":
        assert [g is None for g in returned[-1]].count(True) == 2, "frozen gradients were computed"


@pytest.mark.parametrize("backend", ["triton", "reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_frozen_weights_skip_their_gradients(device, dtype, backend, monkeypatch):
    _skip_unless_backend(backend, cuda=device == "cuda")
    q, k, qw, kw, cos, sin = _qk_inputs(13, 3, 2, 48, dtype, seed=23)
    returned = _spy_backward_ref(monkeypatch, R.qk_norm_rope_backward_ref)

    def backward(weights_need_grad):
        leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True),
                  qw.clone().requires_grad_(weights_need_grad), kw.clone().requires_grad_(weights_need_grad)]
        with use_backend(backend):
            oq, ok = qk_norm_rope(*leaves, cos, sin, EPS)
            g = torch.randn(oq.shape, generator=_gen(24)).to(oq.dtype)
            torch.autograd.backward((oq, ok), (g, torch.randn(ok.shape, generator=_gen(25)).to(ok.dtype)))
        return leaves

    full, frozen = backward(True), backward(False)
    for got, want in zip(frozen[:2], full[:2]):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    assert frozen[2].grad is None and frozen[3].grad is None
    if backend == "reference":
        assert returned[-1][2] is None and returned[-1][3] is None, "frozen weight gradients were computed"


def test_functional_validation():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="sample_index"):
        modulated_rms_norm(x, torch.randn(8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="sample_index"):
        gated_residual(x, x, torch.randn(8), torch.randn(2, 8), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="shift"):
        modulated_layer_norm(x, torch.randn(2, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="fp32"):
        qk_norm_rope(x.view(4, 1, 8), x.view(4, 1, 8), torch.randn(8), torch.randn(8), torch.randn(4, 4).half(),
                     torch.randn(4, 4).half())


# ---------------------------------------------------------------------------------- torch.compile and modules
def test_torch_compile_fullgraph_matches_eager(tmp_path, monkeypatch):
    """All four ops chained in one compiled graph, forward and backward, under both backends. Every leaf is used
    once, so the graphs hold only the custom ops and views: Inductor has no C++ to build (~10 s instead of ~40 s
    on 2 cores); the glue codegen is not what is under test."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    T, D, H = 11, 32, 2
    g = _gen(30)
    shapes = [(T, D), (T, D), (D,), (D,), (2, D), (2, D), (2, D), (2, D), (D // H,), (D // H,)]
    leaves = [torch.randn(*sh, generator=g).requires_grad_(True) for sh in shapes]
    si = torch.tensor([0] * 4 + [1] * 7)
    ang = torch.randn(T, D // H // 2, generator=g)
    cos, sin = ang.cos(), ang.sin()

    def f(x, a, w1, w2, scale1, gate, shift, scale2, qw, kw):
        h = modulated_rms_norm(x, w1, scale1, si)
        y = gated_residual(a, h, w2, gate, si)
        z = modulated_layer_norm(y, shift, scale2, si)
        return qk_norm_rope(z.view(T, H, -1), x.detach().view(T, H, -1), qw, kw, cos, sin)

    compiled = torch.compile(f, fullgraph=True)
    for backend in ("triton", "reference"):
        with use_backend(backend):
            want = f(*leaves)
            dys = [torch.randn(o.shape, generator=g) for o in want]
            want_g = torch.autograd.grad(want, leaves, dys)
            got = compiled(*leaves)
            got_g = torch.autograd.grad(got, leaves, dys)
        for gg, wg in zip([*got, *got_g], [*want, *want_g]):
            torch.testing.assert_close(gg, wg, rtol=1e-5, atol=1e-5)


def test_opcheck_schema_fake_autograd():
    """torch.library.opcheck on every custom op (schema, fake vs real, autograd registration, AOT dispatch)."""
    g = _gen(60)
    rn = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    T, D = 7, 16
    si = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    x, a, s, s2, w = rn(T, D), rn(T, D), rn(2, D), rn(2, D), rn(D)
    q, k, qw, kw, ang = rn(T, 2, 8), rn(T, 3, 8), rn(8), rn(8), rn(T, 4)
    ops = torch.ops.dopsd
    req = lambda *ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    cases = [
        (ops.modulated_rms_norm, (*req(x, w, s), si, EPS)),
        (ops.gated_residual, (*req(x, a, w, s), si, EPS)),
        (ops.qk_norm_rope, (*req(q, k, qw, kw), ang.cos(), ang.sin(), EPS)),
        (ops.modulated_layer_norm, (*req(x, s2, s), si, 1e-6)),
        (ops.modulated_layer_norm, (*req(x), None, *req(s[:1]), None, 1e-6)),
        (ops.modulated_rms_norm_backward, (a, x, w, s, si, EPS, True, False)),
        (ops.gated_residual_backward, (x, a, w, s, si, EPS, False, True)),
        (ops.qk_norm_rope_backward, (q, k, q, k, qw, kw, ang.cos(), ang.sin(), EPS, True)),
        (ops.modulated_layer_norm_backward, (a, x, s2, s, si, 1e-6, True, True)),
    ]
    with use_backend("triton"):
        for op, args in cases:
            torch.library.opcheck(op, args)



@pytest.mark.parametrize("backend", ["triton", "reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_equals_the_custom_ops(device, dtype, backend):
    """The public functions run the ops' bodies through an autograd.Function in eager mode (ops/_eager.py) and the
    dopsd:: custom ops only under torch.compile: same outputs and gradients, bit for bit, and no custom op dispatched
    in eager (what saves the host time)."""
    g = _gen(61)
    rn = lambda *sh: torch.randn(*sh, generator=g).to(dtype)  # noqa: E731
    T, D = 13, 48
    si = torch.tensor([0] * 5 + [1] * 8)
    x, a, w, s, s2 = rn(T, D), rn(T, D), 1 + 0.2 * rn(D), rn(2, D), rn(2, D)
    q, k, qw, kw, ang = rn(T, 3, 16), rn(T, 2, 16), 1 + 0.2 * rn(16), 1 + 0.2 * rn(16), torch.randn(T, 8, generator=g)
    ops = torch.ops.dopsd
    cases = [  # (public function, custom op, differentiable inputs, the other arguments)
        ("modulated_rms_norm", ops.modulated_rms_norm, (x, w, s), (si, EPS)),
        ("gated_residual", ops.gated_residual, (x, a, w, s), (si, EPS)),
        ("qk_norm_rope", ops.qk_norm_rope, (q, k, qw, kw), (ang.cos(), ang.sin(), EPS)),
        ("modulated_layer_norm", ops.modulated_layer_norm, (x, s2, s), (si, 1e-6)),
    ]
    _skip_unless_backend(backend, cuda=device == "cuda")      # (cpp: modulated_layer_norm keeps its auto choice)
    for name, op, diff, rest in cases:
        public = {"modulated_rms_norm": modulated_rms_norm, "gated_residual": gated_residual,
                  "qk_norm_rope": qk_norm_rope, "modulated_layer_norm": modulated_layer_norm}[name]
        results = []
        for fn in (public, op):
            leaves = [t.clone().requires_grad_(True) for t in diff]
            with use_backend(backend), OpsSeen() as seen:
                out = fn(*leaves, *rest)
                outs = out if isinstance(out, tuple) else (out,)
                dys = [torch.randn(o.shape, generator=_gen(62)).to(o.dtype) for o in outs]
                grads = torch.autograd.grad(outs, leaves, dys)
            results.append(([*outs, *grads], seen.names))
        (eager, eager_ops), (custom, custom_ops) = results
        for got, want in zip(eager, custom):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert f"dopsd::{name}" in custom_ops and f"dopsd::{name}_backward" in custom_ops
        assert not any(n.startswith("dopsd::") for n in eager_ops), (name, eager_ops)


class OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the dispatcher ops run inside (custom ops included; Triton launches are not dispatcher ops)."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))

def test_modules_match_reference():
    g = _gen(50)
    T, D, hd = 7, 48, 24
    si = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    x, a = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    scale, shift = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    mrn, gr, qk, mln = ModulatedRMSNorm(D), GatedResidual(D), QKNormRoPE(hd, eps=1e-6), ModulatedLayerNorm()
    with torch.no_grad():
        for p in [*mrn.parameters(), *gr.parameters(), *qk.parameters()]:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    assert list(mrn.state_dict()) == ["weight"] and list(gr.state_dict()) == ["weight"]
    assert list(qk.state_dict()) == ["q_weight", "k_weight"] and not list(mln.state_dict())
    assert repr(mrn) == "ModulatedRMSNorm(48, eps=1e-05)" and "head_dim=24" in repr(qk) and "1e-06" in repr(mln)
    torch.testing.assert_close(mrn(x, scale, si), R.modulated_rms_norm_ref(x, mrn.weight, scale, si, 1e-5))
    torch.testing.assert_close(gr(x, a, scale, si), R.gated_residual_ref(x, a, gr.weight, scale, si, 1e-5))
    torch.testing.assert_close(mln(x, shift, scale, si), R.modulated_layer_norm_ref(x, shift, scale, si, 1e-6))
    ang = torch.randn(T, hd // 2, generator=g)
    q, k = x.view(T, 2, hd), a.view(T, 2, hd)
    for got, want in zip(qk(q, k, ang.cos(), ang.sin()),
                         R.qk_norm_rope_ref(q, k, qk.q_weight, qk.k_weight, ang.cos(), ang.sin(), 1e-6)):
        torch.testing.assert_close(got, want)
    loss = mrn(x, scale, si).sum() + gr(x, a, scale, si).sum() + qk(q, k, ang.cos(), ang.sin())[0].sum()
    loss.backward()
    assert all(p.grad is not None for p in [mrn.weight, gr.weight, qk.q_weight])


# ------------------------------------------------------------------------------ the kernels compile for a GPU
_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dopsd_fast._kernels import epilogues as K

    FP32_PTRS = {"DW", "DS", "DG", "DSH", "DWQ", "DWK", "COS", "SIN"}

    def signature(fn):
        def kind(p):
            if p.is_constexpr:
                return "constexpr"
            if p.name == "eps":
                return "fp32"
            if not p.name.isupper() or p.name in ("T", "D", "B", "HQ", "HK", "HALF"):
                return "i32"
            return "*i64" if p.name == "IDX" else "*fp32" if p.name in FP32_PTRS else "*bf16"
        return {p.name: kind(p) for p in fn.params}

    rows = dict(BLOCK_T=1, BLOCK_D=4096)  # one D = 3840 row per program, as launched on a GPU
    cases = [
        (K._gr_fwd, dict(PER_SAMPLE=True, **rows)),
        (K._mrn_bwd, dict(PER_SAMPLE=True, HAS_DW=True, HAS_DS=True, **rows)),
        (K._gr_bwd, dict(PER_SAMPLE=True, HAS_DW=True, HAS_DG=True, **rows)),
        (K._mln_bwd, dict(PER_SAMPLE=True, HAS_DS=True, HAS_DSH=True, **rows)),
        (K._qk_fwd, dict(BLOCK_T=1, BLOCK_HQ=32, BLOCK_HK=32, BLOCK_HALF=64)),
        (K._qk_bwd, dict(HAS_DW=True, BLOCK_T=1, BLOCK_HQ=32, BLOCK_HK=32, BLOCK_HALF=64)),
    ]
    for fn, consts in cases:
        k = triton.compile(ASTSource(fn, signature(fn), consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8})
        assert k.asm["cubin"] and ".local" not in k.asm["ptx"], fn.__name__  # compiled, no register spills
    print("compiled", len(cases))
""")


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (e.g. a non-constexpr global): compile the kernels with
    the most control flow to sm_90 cubins (Triton's bundled ptxas; no GPU needed) in a process without the
    interpreter flag."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("no ptxas on this machine")
    assert run.returncode == 0 and "compiled 6" in run.stdout, run.stdout + run.stderr[-4000:]
