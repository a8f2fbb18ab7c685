"""Pure-torch reference implementations: the numerical spec of every fused op in dopsd_fast.

Each function here is the ground truth that a fused (Triton/CUDA) kernel is tested against.
They favour clarity over speed and may synchronise with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def packed_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """Bidirectional attention over packed variable-length segments (flash-attn varlen "THD" layout).

    Args:
        q, k, v: (total_tokens, heads, head_dim), same dtype/device/shape. Segment s holds the rows
            cu_seqlens[s]:cu_seqlens[s+1].
        cu_seqlens: int32 (S+1,), cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total_tokens.
        max_seqlen: the longest segment length (must be exact: it is used to detect equal lengths).
        softmax_scale: defaults to head_dim ** -0.5.

    Returns:
        (total_tokens, heads, head_dim) in q's dtype. Each token attends to every token of its own
        segment (no causal mask) and to nothing outside it. Computed by torch SDPA in the input dtype.
    """
    total, heads, head_dim = q.shape
    assert k.shape == q.shape and v.shape == q.shape, "q, k, v must share (total_tokens, heads, head_dim)"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
    num_segments = cu_seqlens.numel() - 1

    def sdpa(qs: Tensor, ks: Tensor, vs: Tensor) -> Tensor:
        # (N, L, H, D) -> SDPA wants (N, H, L, D)
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), scale=softmax_scale
        )
        return out.transpose(1, 2)

    # Every length is <= max_seqlen, so total == S * max_seqlen means all segments are equal:
    # one batched call, no host sync.
    if num_segments > 0 and total == num_segments * max_seqlen:
        shape = (num_segments, max_seqlen, heads, head_dim)
        return sdpa(q.view(shape), k.view(shape), v.view(shape)).reshape(total, heads, head_dim)

    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == total, "cu_seqlens must span [0, total_tokens]"
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            outs.append(sdpa(q[None, start:end], k[None, start:end], v[None, start:end])[0])
    return torch.cat(outs, dim=0) if outs else torch.empty_like(q)
