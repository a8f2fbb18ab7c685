"""Functional entry point for packed (varlen) bidirectional attention."""

from __future__ import annotations

from torch import Tensor

from dopsd_fast.ops.reference import packed_attention_ref


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """Attention inside each packed segment; contract as `dopsd_fast.ops.reference.packed_attention_ref`.

    q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32 (S+1,). Returns (total_tokens, heads, head_dim).
    For now this calls the pure-torch reference; a fused Triton varlen kernel replaces it later.
    """
    return packed_attention_ref(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
