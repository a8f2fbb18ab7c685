"""Packed (varlen) bidirectional attention with LSE, and exact shared-prefix attention (tiers 2+3).

``packed_attention`` is what the models call (self-attention inside each packed segment). ``packed_attention_with_lse``
is the general form (separate query / key segments, flash_attn_varlen_func's argument order) returning the
log-sum-exp too, differentiable through both outputs. ``prefix_attention`` lets several query segments attend to one
shared KV prefix plus their own KV suffix: two partial attentions merged by ``merge_state``, exact (up to rounding)
but only valid when the prefix KV really is identical for every segment, which a ``PrefixPlan`` must certify.
Kernels: kernels/packed_attention.py (FlashAttention-2 forward; backward = preprocess, dK/dV pass, separate dQ pass).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops.merge_state import merge_state
from dopsd_fast.ops.reference import (equal_segments, packed_attention_lse_bwd_ref, packed_attention_lse_ref,
                                      packed_attention_ref)


@torch.library.custom_op("dopsd::packed_attention", mutates_args=())
def _packed_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> tuple[Tensor, Tensor]:
    # -> O (Tq, H, D) q.dtype, LSE fp32 (H, Tq)
    if backend_for("packed_attention_lse", q, k, v, cu_seqlens_q, cu_seqlens_k) == "triton":
        from dopsd_fast._kernels import packed_attention as _k
        return _k.packed_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    out, lse = packed_attention_lse_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    return out.contiguous(), lse.contiguous()


@_packed_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dopsd::packed_attention_backward", mutates_args=())
def _packed_attention_backward_op(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend_for("packed_attention_lse", dout, q, k, v, out, lse) == "triton":
        from dopsd_fast._kernels import packed_attention as _k
        return _k.packed_attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k, softmax_scale)
    return packed_attention_lse_bwd_ref(dout, dlse, q, k, v, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale)


@_packed_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)


def _backward(ctx, g_out, g_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if g_out is None:
        g_out = torch.zeros_like(out)
    dq, dk, dv = _packed_attention_backward_op(g_out, g_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_packed_attention_op.register_autograd(_backward, setup_context=_setup_context)


def packed_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Varlen attention with separate query / key segments, returning (O, LSE).

    Args:
        q: (Tq, H, D); k, v: (Tk, H, D); one dtype among fp32 / fp16 / bf16, same device; last dim contiguous
            (other layouts are copied). Triton path: D <= 128.
        cu_seqlens_q, cu_seqlens_k: int32 (S+1,) on the same device; [0] == 0, non-decreasing, [-1] == Tq / Tk.
            Query segment s (rows cu_seqlens_q[s]:cu_seqlens_q[s+1]) attends to every key of KV segment s and to
            nothing else (no mask inside a segment). A KV segment may be empty (those queries get O = 0,
            LSE = -inf); a query segment may be empty.
        max_seqlen_q, max_seqlen_k: the longest query / KV segment (exact: they size the grid, and the reference
            detects all-equal lengths from them).
        softmax_scale: defaults to D ** -0.5.

    Returns:
        O: (Tq, H, D) in q's dtype, fp32 online softmax. LSE: fp32 (H, Tq) (flash-attn varlen's softmax_lse layout)
        = logsumexp over the segment's keys of softmax_scale * q . k, natural-log units.
        Differentiable w.r.t. q, k, v through O and LSE (the dLSE term enters the backward as
        delta = rowsum(dO * O) - dLSE). Deterministic backward (separate dQ pass, no atomics).
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (Tq, H, D), k and v (Tk, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _packed_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale)


def _torch_varlen_attn() -> Callable[..., Tensor] | None:
    """torch.nn.attention.varlen.varlen_attn where this torch has it with a ``scale`` argument (2.11 on), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    # torch 2.10's first version takes no softmax scale; pre-scaling q would round differently from the reference
    return varlen_attn if "scale" in inspect.signature(varlen_attn).parameters else None


_VARLEN_ATTN = _torch_varlen_attn()


def _varlen_impl(q: Tensor) -> Callable[..., Tensor] | None:
    """torch's varlen_attn where its kernel takes q, else None (then the reference loops over the segments).

    varlen_attn runs aten::_flash_attention_forward / _backward (FlashAttention-2; its cuDNN branch is switched off
    in torch 2.13): CUDA only (sm80 on), fp16 / bf16 only, head dim a multiple of 8 up to 256; differentiable through
    its own custom op and autograd registration, so torch.compile traces it without a graph break.
    """
    if (_VARLEN_ATTN is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16)
            or q.shape[-1] % 8 or q.shape[-1] > 256):
        return None
    # get_device_properties is constant-folded by dynamo, so this check costs nothing under torch.compile
    return _VARLEN_ATTN if torch.cuda.get_device_properties(q.device).major >= 8 else None


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """Bidirectional attention inside each packed segment (flash-attn varlen "THD" layout); output only.

    q, k, v: (T, H, D), one dtype (fp32 / fp16 / bf16); cu_seqlens: int32 (S+1,) ([0] == 0, non-decreasing,
    [-1] == T); max_seqlen: the exact longest segment; softmax_scale defaults to D ** -0.5.
    Returns (T, H, D) in q's dtype, differentiable w.r.t. q, k, v; see packed_attention_with_lse for the general form.
    Backend "triton": the varlen kernel (fp32 online softmax). Backend "reference": PyTorch's attention in the input
    dtype, autograd backward. On CPU, and for equal segments everywhere, that is exactly
    dopsd_fast.ops.reference.packed_attention_ref (torch SDPA), so the models' reference path stays bit-compatible
    with diffusers' SDPA attention. Unequal segments on CUDA in fp16 / bf16 run torch's varlen_attn instead (torch
    2.11 on; the same FlashAttention-2 kernels SDPA picks there): one launch over all segments where the reference
    loops over them after a ``cu_seqlens.tolist()`` host sync. ``auto`` on CUDA picks the reference: there SDPA
    runs FlashAttention-2, whose backward measured 2.3x faster than our Triton one on an H200 (forward + backward
    296 vs 152 TFLOP/s at 2 x 4608 tokens, 30 heads of 128; ``_dispatch.CUDA_AUTO``). The Triton kernel stays the
    path for what SDPA lacks: the LSE output and separate query / key segments (``packed_attention_with_lse``,
    ``prefix_attention``).
    """
    if backend_for("packed_attention", q, k, v, cu_seqlens) == "triton":
        return packed_attention_with_lse(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale)[0]
    varlen_attn = _varlen_impl(q)
    if equal_segments(q.shape[0], cu_seqlens, max_seqlen):
        return packed_attention_ref(q, k, v, cu_seqlens, max_seqlen, softmax_scale)    # one batched SDPA
    if varlen_attn is None:
        return _segment_loop(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel's only layout demand
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=softmax_scale)


# The reference's loop over unequal segments reads cu_seqlens on the host: under torch.compile (model.compile=blocks)
# it runs eagerly, a graph break, instead of being traced with data-dependent bounds (which Inductor miscompiled:
# NameError on a size symbol, torch 2.13).
_segment_loop = torch.compiler.disable(packed_attention_ref)


class PrefixPlan:
    """Certificate that one KV prefix is shared, bit for bit, by every query segment of a prefix_attention call.

    Prefix reuse is exact only where the prefix KV is identical for all segments (shared/reference/method.md section
    12: a causal encoder over a common token prefix at identical positions, or reference tokens computed
    independently of x). Inside bidirectional joint attention the "same" tokens have different K/V per sample, and
    sharing them would be an approximation. So prefix_attention refuses to run without a plan, and accepts a plan
    only together with the very tensors it was built from, not modified in place since.

    Build one with:
      * ``PrefixPlan.shared(k_prefix, v_prefix, source=...)``: the caller computed the prefix KV once (one encoder
        pass over the common tokens, a KV cache entry); ``source`` says where it came from (kept for messages).
      * ``PrefixPlan.from_segments(k_list, v_list, source=...)``: per-segment candidate prefixes, checked here for
        bitwise equality (one host sync); the plan is for ``k_list[0]`` / ``v_list[0]``. Raises ValueError if any
        segment's prefix differs.
    """

    __slots__ = ("k", "v", "source", "_versions")
    _key = object()

    def __init__(self, k: Tensor, v: Tensor, source: str, _key: object = None):
        if _key is not PrefixPlan._key:
            raise TypeError("build a PrefixPlan with PrefixPlan.shared(...) or PrefixPlan.from_segments(...)")
        if not isinstance(source, str) or not source.strip():
            raise ValueError("PrefixPlan needs a non-empty `source` saying where the shared prefix KV came from")
        if k.dim() != 3 or k.shape != v.shape or k.shape[0] < 1:
            raise ValueError(f"prefix k, v must be (P, H, D) with P >= 1; got {tuple(k.shape)}, {tuple(v.shape)}")
        self.k, self.v, self.source = k, v, source
        self._versions = (k._version, v._version)

    @classmethod
    def shared(cls, k_prefix: Tensor, v_prefix: Tensor, *, source: str) -> "PrefixPlan":
        return cls(k_prefix, v_prefix, source, cls._key)

    @classmethod
    def from_segments(cls, k_prefixes: list[Tensor], v_prefixes: list[Tensor], *, source: str) -> "PrefixPlan":
        if not k_prefixes or len(k_prefixes) != len(v_prefixes):
            raise ValueError("from_segments needs one (k, v) prefix per segment, at least one")
        k0, v0 = k_prefixes[0], v_prefixes[0]
        for i, (k, v) in enumerate(zip(k_prefixes, v_prefixes)):
            if not (torch.equal(k, k0) and torch.equal(v, v0)):
                raise ValueError(f"prefix KV of segment {i} differs from segment 0 ({source}): the prefix is not "
                                 "shared, so prefix attention would not be exact; attend over the full KV instead")
        return cls(k0, v0, source, cls._key)

    def check(self, k_prefix: Tensor, v_prefix: Tensor) -> None:
        if k_prefix is not self.k or v_prefix is not self.v:
            raise ValueError(f"PrefixPlan ({self.source}) was built for other prefix tensors than the ones passed")
        # The in-place check runs eagerly; under torch.compile the version counter is not traceable (identity is).
        if not torch.compiler.is_compiling() and (k_prefix._version, v_prefix._version) != self._versions:
            raise ValueError(f"prefix KV of PrefixPlan ({self.source}) was modified in place after the plan was built")

    def __repr__(self) -> str:
        return f"PrefixPlan(prefix_len={self.k.shape[0]}, source={self.source!r})"


def prefix_attention(
    q: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    k_suffix: Tensor,
    v_suffix: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_suffix: Tensor,
    max_seqlen_q: int,
    max_seqlen_suffix: int,
    *,
    plan: PrefixPlan | None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Each query segment attends to concat(shared KV prefix, its own KV suffix), without copying the prefix.

    Args:
        q: (Tq, H, D) packed query segments; cu_seqlens_q int32 (S+1,); max_seqlen_q its longest segment.
        k_prefix, v_prefix: (P, H, D), P >= 1: ONE prefix seen by every query segment, certified by ``plan``.
        k_suffix, v_suffix: (Tk, H, D) packed per-segment suffixes, cu_seqlens_suffix int32 (S+1,) (segment s's
            suffix = rows cu_seqlens_suffix[s]:cu_seqlens_suffix[s+1]); max_seqlen_suffix its longest segment.
            Empty suffixes are allowed (Tk and max_seqlen_suffix may be 0): those queries see the prefix only.
        plan: a PrefixPlan built from exactly (k_prefix, v_prefix); anything else raises ValueError.
        softmax_scale: defaults to D ** -0.5. return_lse: also return LSE fp32 (H, Tq).

    Computes (O1, LSE1) = all queries vs the prefix (one query segment of Tq rows: every query sees the same keys),
    (O2, LSE2) = segment-wise queries vs suffixes, then merge_state. All tensors one dtype, one device.
    Differentiable w.r.t. q, k_prefix, v_prefix, k_suffix, v_suffix. Partial outputs are rounded to q's dtype before
    the (fp32) merge: fp16/bf16 results carry one extra rounding compared to a single attention over the
    concatenated KV.
    """
    if not isinstance(plan, PrefixPlan):
        raise ValueError("prefix_attention is exact only when the prefix KV is identical for every query segment; "
                         "pass plan=PrefixPlan.shared(k_prefix, v_prefix, source=...) (or PrefixPlan.from_segments) "
                         "to certify it, otherwise use packed_attention over the concatenated KV")
    plan.check(k_prefix, v_prefix)
    tq, p = q.shape[0], k_prefix.shape[0]
    one_q = torch.tensor([0, tq], dtype=torch.int32, device=q.device)
    one_p = torch.tensor([0, p], dtype=torch.int32, device=q.device)
    o1, lse1 = packed_attention_with_lse(q, k_prefix, v_prefix, one_q, one_p, tq, p, softmax_scale)
    o2, lse2 = packed_attention_with_lse(q, k_suffix, v_suffix, cu_seqlens_q, cu_seqlens_suffix, max_seqlen_q,
                                         max_seqlen_suffix, softmax_scale)
    out, lse = merge_state(o1, lse1, o2, lse2)
    return (out, lse) if return_lse else out


__all__ = ["packed_attention", "packed_attention_with_lse", "prefix_attention", "PrefixPlan"]
