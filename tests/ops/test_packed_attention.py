"""packed_attention, packed_attention_with_lse, prefix_attention: Triton launchers and custom ops vs references."""
import pytest
import torch
import torch.nn.functional as F

import dopsd_fast.ops.packed_attention as attention_ops
from dopsd_fast._kernels import packed_attention as _k
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.packed_attention import PrefixPlan, packed_attention, packed_attention_with_lse, prefix_attention
from dopsd_fast.ops.reference import packed_attention_lse_ref, packed_attention_ref, prefix_attention_ref

NEG_INF = float("-inf")
# (dtype, rtol, atol) of outputs and input gradients against the reference computed in fp32 from the same rounded
# inputs. Under the interpreter every dot runs in fp32, so the error is one fp32 -> dtype rounding (fp16 2^-11,
# bf16 2^-8 relative) plus fp32 summation order; values and gradients here are O(1). LSE is fp32 in every case.
TOLERANCES = [(torch.float32, 2e-6, 2e-6), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1e-2, 1e-2)]
GRAD_TOL_FP32 = dict(rtol=1e-5, atol=1e-5)
LSE_TOL = dict(rtol=1e-5, atol=1e-5)


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def randn(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator(torch.get_default_device()).manual_seed(seed)).to(dtype)


def make_qkv(len_q, len_k, heads, head_dim, dtype, seed=0):
    return (randn((sum(len_q), heads, head_dim), dtype, seed), randn((sum(len_k), heads, head_dim), dtype, seed + 1),
            randn((sum(len_k), heads, head_dim), dtype, seed + 2))


def ref_with_grads(q, k, v, cu_q, cu_k, max_q, max_k, dout, dlse, scale=None):
    """Reference (fp32 math from the given inputs) forward and autograd backward with cotangents (dout, dlse)."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = packed_attention_lse_ref(*leaves, cu_q, cu_k, max_q, max_k, scale)
    pairs = [(o, g) for o, g in ((out, dout.float()), (lse, dlse)) if o.requires_grad]
    grads = [None] * 3
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return out.detach(), lse.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


# Query / KV segment lengths: cross lengths, an empty query segment, an empty KV segment, lengths off the blocks.
LEN_Q, LEN_K = [1, 0, 37, 70], [5, 9, 0, 40]


@pytest.mark.parametrize("dtype,rtol,atol", TOLERANCES)
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_launchers_match_reference(device, head_dim, dtype, rtol, atol):
    heads = 2
    q, k, v = make_qkv(LEN_Q, LEN_K, heads, head_dim, dtype, seed=head_dim)
    cu_q, cu_k = cu_of(LEN_Q), cu_of(LEN_K)
    blocks = dict(block_m=16, block_n=16)  # several blocks per segment: online-softmax rescaling and tails
    out, lse = torch.full_like(q, float("nan")), torch.full((heads, q.shape[0]), float("nan"))
    got, got_lse = _k.packed_attention_fwd(q, k, v, cu_q, cu_k, 70, 40, out=out, lse=lse, **blocks)
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()

    dout, dlse = randn(q.shape, dtype, seed=7), randn((heads, q.shape[0]), seed=8)
    want, want_lse, want_grads = ref_with_grads(q, k, v, cu_q, cu_k, 70, 40, dout, dlse)
    assert not got.isnan().any() and not got_lse.isnan().any()
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_lse, want_lse, **LSE_TOL)
    # segment 2 has no keys: O = 0 and LSE = -inf exactly (rows 1:38)
    assert (got[1:38] == 0).all() and (got_lse[:, 1:38] == NEG_INF).all()

    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    grads = _k.packed_attention_bwd(dout, dlse, q, k, v, got, got_lse, cu_q, cu_k, 70, 40,
                                    dq=bufs[0], dk=bufs[1], dv=bufs[2], **blocks)
    for name, g, w, buf in zip("qkv", grads, want_grads, bufs):
        assert g.data_ptr() == buf.data_ptr() and g.dtype == dtype and not g.isnan().any(), name
        tol = GRAD_TOL_FP32 if dtype == torch.float32 else dict(rtol=rtol, atol=atol)
        torch.testing.assert_close(g.float(), w, **tol, msg=f"d{name}")
    assert (grads[1][5:14] == 0).all()  # keys of segment 1 have no queries: zero gradient


@pytest.mark.parametrize("dtype,rtol,atol", [TOLERANCES[0], TOLERANCES[2]])
def test_head_dim_128_and_default_blocks(device, dtype, rtol, atol):
    len_q, len_k = [9, 4], [7, 20]
    q, k, v = make_qkv(len_q, len_k, 1, 128, dtype, seed=3)
    cu_q, cu_k = cu_of(len_q), cu_of(len_k)
    out, lse = _k.packed_attention_fwd(q, k, v, cu_q, cu_k, 9, 20, softmax_scale=0.05)
    dout = randn(q.shape, dtype, seed=4)
    want, want_lse, want_grads = ref_with_grads(q, k, v, cu_q, cu_k, 9, 20, dout, torch.zeros_like(lse), scale=0.05)
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)
    for g, w in zip(_k.packed_attention_bwd(dout, None, q, k, v, out, lse, cu_q, cu_k, 9, 20, softmax_scale=0.05),
                    want_grads):
        tol = GRAD_TOL_FP32 if dtype == torch.float32 else dict(rtol=rtol, atol=atol)
        torch.testing.assert_close(g.float(), w, **tol)


def test_self_attention_matches_sdpa_spec():
    """The model-facing packed_attention (Triton) equals packed_attention_ref (torch SDPA), fp32, odd lengths."""
    lengths = [1, 5, 123]
    q, k, v = make_qkv(lengths, lengths, 3, 16, torch.float32, seed=11)
    with use_backend("triton"):
        got = packed_attention(q, k, v, cu_of(lengths), 123, softmax_scale=0.3)
    torch.testing.assert_close(got, packed_attention_ref(q, k, v, cu_of(lengths), 123, softmax_scale=0.3),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,rtol,atol", [TOLERANCES[0], TOLERANCES[2]])
def test_custom_op_forward_backward_with_lse(device, backend, dtype, rtol, atol):
    """packed_attention_with_lse: a loss on O and LSE (so dLSE != 0) vs autograd through the reference."""
    len_q, len_k = [3, 50], [33, 17]
    q, k, v = make_qkv(len_q, len_k, 2, 32, dtype, seed=5)
    cu_q, cu_k = cu_of(len_q), cu_of(len_k)
    w_out, w_lse = randn(q.shape, seed=6), randn((2, q.shape[0]), seed=7)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend(backend):
        out, lse = packed_attention_with_lse(*leaves, cu_q, cu_k, 50, 33)
        ((out.float() * w_out).sum() + (lse * w_lse).sum()).backward()
    want, want_lse, want_grads = ref_with_grads(q, k, v, cu_q, cu_k, 50, 33, w_out, w_lse)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, q.shape[0])
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)
    for leaf, w in zip(leaves, want_grads):
        tol = GRAD_TOL_FP32 if dtype == torch.float32 else dict(rtol=rtol, atol=atol)
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.float(), w, **tol)


def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    """One fullgraph compile covering packed_attention and prefix_attention (two partials + merge_state), fwd + bwd."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    lengths, len_s = [7, 25], [3, 0]
    q, k, v = make_qkv(lengths, lengths, 2, 16, torch.float32, seed=9)
    kp, vp, ks, vs = (randn(shape, seed=10 + i) for i, shape in enumerate([(5, 2, 16)] * 2 + [(3, 2, 16)] * 2))
    cu, cu_s = cu_of(lengths), cu_of(len_s)

    def fn(q, k, v, kp, vp, ks, vs, plan):
        self_attn = packed_attention(q * 1.5, k, v, cu, 25)
        prefixed = prefix_attention(q, kp, vp, ks, vs, cu, cu_s, 25, 3, plan=plan)
        return (self_attn ** 2).sum() + (prefixed * self_attn).sum()

    results = []
    with use_backend("triton"):
        for f in (fn, torch.compile(fn, fullgraph=True)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, kp, vp, ks, vs)]
            loss = f(*leaves, PrefixPlan.shared(leaves[3], leaves[4], source="test"))
            loss.backward()
            results.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_registrations():
    """Schema, fake tensor, autograd registration and AOT dispatch of dopsd::packed_attention (reference backend)."""
    from dopsd_fast.ops.packed_attention import _packed_attention_op

    q, k, v = (t.requires_grad_() for t in make_qkv([5, 7], [3, 7], 2, 16, torch.float32, seed=12))
    with use_backend("reference"):
        torch.library.opcheck(_packed_attention_op, (q, k, v, cu_of([5, 7]), cu_of([3, 7]), 7, 7, 0.25))


# ----------------------------------------------------------------------------------------------------------------------
# packed_attention on unequal segments: torch's varlen_attn on CUDA (fp16 / bf16), a stand-in for it on CPU


def masked_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """CPU stand-in for torch.nn.attention.varlen.varlen_attn (same call, self-attention only) without host syncs:
    one SDPA over all tokens, masked to the block diagonal of the segments."""
    assert cu_seq_q is cu_seq_k and max_q == max_k
    segment = torch.searchsorted(cu_seq_q, torch.arange(query.shape[0], dtype=cu_seq_q.dtype), right=True)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (query, key, value)),
                                         attn_mask=segment[:, None] == segment[None, :], scale=scale)
    return out.transpose(0, 1)


def _host_sync(*args, **kwargs):
    raise AssertionError("packed_attention synchronised with the host")


def test_unequal_segments_run_varlen_attn_without_host_sync(device, monkeypatch):
    """Output and input gradients match the per-segment SDPA spec; no cu_seqlens.tolist() / .item() on the way."""
    lengths, dtype = [37, 5, 0, 70], torch.bfloat16
    q, k, v = make_qkv(lengths, lengths, 2, 32, dtype, seed=13)
    cu, dout = cu_of(lengths), randn(q.shape, dtype, seed=14)
    varlen_attn = masked_varlen_attn if device == "cpu" else attention_ops._varlen_impl(q)
    if varlen_attn is None:
        pytest.skip("this torch has no varlen_attn taking a softmax scale (torch < 2.11)")
    scales = []

    def recording_varlen_attn(*args, scale):
        scales.append(scale)
        return varlen_attn(*args, scale=scale)

    monkeypatch.setattr(attention_ops, "_varlen_impl", lambda q: recording_varlen_attn)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with monkeypatch.context() as no_sync, use_backend("reference"):
        no_sync.setattr(torch.Tensor, "tolist", _host_sync)
        no_sync.setattr(torch.Tensor, "item", _host_sync)
        out = packed_attention(*leaves, cu, 70, softmax_scale=0.2)
        out.backward(dout)
    assert scales == [0.2] and out.dtype == dtype

    spec_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    spec = packed_attention_ref(*spec_leaves, cu, 70, softmax_scale=0.2)
    spec.backward(dout)
    gold, _, gold_grads = ref_with_grads(q, k, v, cu, cu, 70, 70, dout, torch.zeros(2, q.shape[0]), scale=0.2)
    # Both round to bf16 differently: bound the error against fp32 by twice the spec's own (flash-attention's test)
    for name, got, want, g in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                                  [spec] + [t.grad for t in spec_leaves], [gold] + gold_grads):
        assert (got.float() - g).abs().max() <= 2 * (want.float() - g).abs().max() + 1e-6, name


def test_cpu_and_equal_segments_keep_the_sdpa_spec(monkeypatch):
    """The models' CPU reference path and equal segments stay packed_attention_ref, bit for bit."""
    q, k, v = make_qkv([16, 23, 9], [16, 23, 9], 2, 16, torch.bfloat16, seed=15)
    unequal, equal = (q, k, v, cu_of([16, 23, 9]), 23), (q[:32], k[:32], v[:32], cu_of([16, 16]), 16)
    assert attention_ops._varlen_impl(q) is None  # CPU tensors never take varlen_attn
    with use_backend("reference"):
        assert torch.equal(packed_attention(*unequal), packed_attention_ref(*unequal))
        monkeypatch.setattr(attention_ops, "_varlen_impl", lambda q: _host_sync)  # returned, never called
        assert torch.equal(packed_attention(*equal), packed_attention_ref(*equal))


# ----------------------------------------------------------------------------------------------------------------------
# prefix attention: (query lengths, prefix length, suffix lengths); empty suffixes are allowed
PREFIX_CASES = {
    "1seg_p1_s5": ([13], 1, [5]),
    "1seg_p17_s0": ([13], 17, [0]),
    "3seg_p64_s5_40_0": ([7, 20, 3], 64, [5, 40, 0]),
    "3seg_p17_s40_5_5": ([1, 9, 33], 17, [40, 5, 5]),
    "3seg_p1_all_empty": ([6, 11, 2], 1, [0, 0, 0]),
}


def prefix_inputs(len_q, p, len_s, dtype, heads=2, head_dim=16, seed=0):
    q = randn((sum(len_q), heads, head_dim), dtype, seed)
    kp, vp = randn((p, heads, head_dim), dtype, seed + 1), randn((p, heads, head_dim), dtype, seed + 2)
    ks = randn((sum(len_s), heads, head_dim), dtype, seed + 3)
    vs = randn((sum(len_s), heads, head_dim), dtype, seed + 4)
    return q, kp, vp, ks, vs


def run_prefix(inputs, len_q, len_s, weights, return_lse=False):
    leaves = [t.clone().requires_grad_() for t in inputs]
    plan = PrefixPlan.shared(leaves[1], leaves[2], source="test: one prefix tensor")
    res = prefix_attention(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], cu_of(len_q), cu_of(len_s),
                           max(len_q), max(len_s), plan=plan, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    loss = (out.float() * weights[0]).sum() + ((lse * weights[1]).sum() if return_lse else 0)
    loss.backward()
    return out, lse, [t.grad for t in leaves]


def prefix_gold(inputs, len_q, len_s, weights, return_lse=False):
    """Plain attention of each query segment over concat(prefix, its suffix), fp32 math, autograd."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    out, lse = prefix_attention_ref(*leaves, cu_of(len_q), cu_of(len_s))
    ((out * weights[0]).sum() + ((lse * weights[1]).sum() if return_lse else 0)).backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_prefix_attention_equals_attention_over_concatenated_kv(device, case):
    len_q, p, len_s = PREFIX_CASES[case]
    inputs = prefix_inputs(len_q, p, len_s, torch.float32, seed=len(case))
    weights = (randn(inputs[0].shape, seed=21), randn((2, inputs[0].shape[0]), seed=22))
    use_lse = "3seg" in case  # also back-propagate through the merged LSE
    with use_backend("triton"):
        out, lse, grads = run_prefix(inputs, len_q, len_s, weights, return_lse=use_lse)
    want, want_lse, want_grads = prefix_gold(inputs, len_q, len_s, weights, return_lse=use_lse)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    if use_lse:
        torch.testing.assert_close(lse, want_lse, **LSE_TOL)
    for name, g, w in zip(("dq", "dk_prefix", "dv_prefix", "dk_suffix", "dv_suffix"), grads, want_grads):
        torch.testing.assert_close(g, w, **GRAD_TOL_FP32, msg=name)


# fp16 / bf16: the two partial outputs are rounded to the I/O dtype before the fp32 merge, so two roundings.
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_prefix_attention_half_precision(device, backend, dtype, tol):
    len_q, p, len_s = PREFIX_CASES["3seg_p17_s40_5_5"]
    inputs = prefix_inputs(len_q, p, len_s, dtype, seed=3)
    weights = (randn(inputs[0].shape, seed=23), randn((2, inputs[0].shape[0]), seed=24))
    with use_backend(backend):
        out, lse, grads = run_prefix(inputs, len_q, len_s, weights, return_lse=True)
    want, want_lse, want_grads = prefix_gold(inputs, len_q, len_s, weights, return_lse=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol)


def test_prefix_attention_refuses_without_a_valid_plan():
    len_q, p, len_s = [4, 6], 5, [3, 2]
    q, kp, vp, ks, vs = prefix_inputs(len_q, p, len_s, torch.float32)
    args = (q, kp, vp, ks, vs, cu_of(len_q), cu_of(len_s), 6, 3)
    with pytest.raises(ValueError, match="identical for every query segment"):
        prefix_attention(*args, plan=None)
    with pytest.raises(ValueError, match="identical for every query segment"):
        prefix_attention(*args, plan=True)  # a bare flag is not a certificate
    with pytest.raises(ValueError, match="other prefix tensors"):
        prefix_attention(*args, plan=PrefixPlan.shared(kp.clone(), vp, source="a copy"))
    plan = PrefixPlan.shared(kp, vp, source="encoder pass over the common prompt tokens")
    prefix_attention(*args, plan=plan)  # accepted
    kp.mul_(1.0)  # in-place write after the plan: the plan no longer vouches for the data
    with pytest.raises(ValueError, match="modified in place"):
        prefix_attention(*args, plan=plan)
    with pytest.raises(TypeError):
        PrefixPlan(kp, vp, "direct")
    with pytest.raises(ValueError, match="source"):
        PrefixPlan.shared(kp, vp, source=" ")
    with pytest.raises(ValueError, match="P >= 1"):
        PrefixPlan.shared(kp[:0], vp[:0], source="empty prefix")
    # per-segment candidate prefixes: equal ones give a plan for the first, a differing one is refused
    plan = PrefixPlan.from_segments([kp, kp.clone()], [vp, vp.clone()], source="per-role KV cache")
    assert plan.k is kp and "per-role" in repr(plan)
    other = kp.clone()
    other[2, 1, 3] += 1e-3
    with pytest.raises(ValueError, match="segment 1 differs"):
        PrefixPlan.from_segments([kp, other], [vp, vp], source="per-role KV cache")


def test_z_image_forward_triton_matches_reference(device):
    """A tiny ZImageTransformer (fp32): the Triton attention path equals the reference (SDPA) path."""
    from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer

    cfg = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                       axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
    torch.manual_seed(0)
    model = ZImageTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.2) + (p.dim() < 2))
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 6, 10, generator=g)]
    caps = [torch.randn(n, 32, generator=g) for n in (7, 40)]
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        with use_backend("reference"):
            want = model(x, t, cap_feats=caps)
        with use_backend("triton"):
            got = model(x, t, cap_feats=caps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
