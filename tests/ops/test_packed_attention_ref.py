"""packed_attention_ref against an independent per-segment attention loop (fp64 gold)."""

import pytest
import torch

from dopsd_fast.ops.packed_attention import packed_attention
from dopsd_fast.ops.reference import packed_attention_ref

HEADS, HEAD_DIM = 3, 16


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def loop_attention(q, k, v, lengths, scale=None):
    """Explicit softmax(q k^T * scale) v per segment; q, k, v: (T, H, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        probs = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def make_qkv(lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


# (dtype, tolerance): fp32 is exact up to summation order; bf16 output rounding is ~2^-8 relative.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1, 5, 123], [17, 17, 17], [64]])
def test_forward_matches_loop(dtype, lengths):
    q, k, v = make_qkv(lengths, dtype)
    out = packed_attention_ref(q, k, v, cu_seqlens_of(lengths), max(lengths))
    assert out.shape == q.shape and out.dtype == dtype
    gold = loop_attention(q.double(), k.double(), v.double(), lengths)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), gold, rtol=tol, atol=tol)
    # The functional (Triton kernel or this reference, per dispatch) meets the same bound against the fp64 loop.
    fused = packed_attention(q, k, v, cu_seqlens_of(lengths), max(lengths))
    assert fused.dtype == dtype
    torch.testing.assert_close(fused.double(), gold, rtol=tol, atol=tol)


def test_softmax_scale_and_isolation():
    lengths = [1, 5, 123]
    q, k, v = make_qkv(lengths, torch.float32)
    cu = cu_seqlens_of(lengths)
    out = packed_attention_ref(q, k, v, cu, 123, softmax_scale=0.3)
    gold = loop_attention(q.double(), k.double(), v.double(), lengths, scale=0.3)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    # Changing the last segment's keys/values must not move the first two segments.
    k2, v2 = k.clone(), v.clone()
    k2[6:] += 1.0
    v2[6:] -= 3.0
    out2 = packed_attention_ref(q, k2, v2, cu, 123, softmax_scale=0.3)
    assert torch.equal(out2[:6], out[:6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1, 5, 123], [9, 9]])
def test_backward_matches_loop(dtype, lengths):
    q, k, v = (t.requires_grad_() for t in make_qkv(lengths, dtype))
    gq, gk, gv = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    packed_attention_ref(q, k, v, cu_seqlens_of(lengths), max(lengths)).backward(grad_out.to(dtype))
    loop_attention(gq, gk, gv, lengths).backward(grad_out)

    tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16 grads accumulate several bf16 roundings
    for ours, gold in ((q, gq), (k, gk), (v, gv)):
        assert ours.grad.dtype == dtype
        torch.testing.assert_close(ours.grad.double(), gold.grad, rtol=tol, atol=tol)
