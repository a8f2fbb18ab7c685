"""Packed multi-adapter LoRA linear: one base GEMM over all rows, a LoRA term per row segment (tiers 2+3).

Rows of several adapters over one base (e.g. a frozen EMA teacher's and a trainable student's) go through one
call: the base weight is read once. The D-OPSD trainer does not use it: its roles run as two forwards, since one
forward of both would put the teacher rows in the student's autograd graph. Adapters are passed as *lists* of
per-adapter tensors, not one stacked tensor, so that each adapter keeps its own ``requires_grad`` (student
trainable, teacher frozen) and the backward computes dA/dB only for the adapters that need them. The base
weight/bias get gradients only when they require grad (dW = dY^T X, db = sum dY by torch matmul: unfused, meant
for the rare trainable-base case).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops.reference import lora_linear_bwd_ref, lora_linear_ref

_EMPTY = (0,)


def _down_ref(x: Tensor, lora_A: list[Tensor], seg_offsets: Tensor, seg_adapter: Tensor) -> Tensor:
    """U (T, r) fp32 = X A_a^T on each row of a segment with adapter a, 0 elsewhere (the launcher's ``u``)."""
    u = x.new_zeros(x.shape[0], lora_A[0].shape[0], dtype=torch.float32)
    for lo, hi, a in zip(seg_offsets.tolist()[:-1], seg_offsets.tolist()[1:], seg_adapter.tolist()):
        if a >= 0:
            u[lo:hi] = x[lo:hi].float() @ lora_A[a].float().t()
    return u


@torch.library.custom_op("dopsd::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
                    scale: float, seg_offsets: Tensor, seg_adapter: Tensor) -> tuple[Tensor, Tensor]:
    if backend_for("lora_linear", x, weight) == "triton":
        from dopsd_fast._kernels import lora_linear as _k   # lazy: triton is optional, TRITON_INTERPRET read at import

        return _k.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, seg_offsets, seg_adapter)
    y = lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, seg_offsets, seg_adapter)
    return y, _down_ref(x, lora_A, seg_offsets, seg_adapter)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, seg_offsets, seg_adapter):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A[0].shape[0], dtype=torch.float32)


@torch.library.custom_op("dopsd::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Optional[Tensor], weight: Tensor, lora_A: list[Tensor],
                             lora_B: list[Tensor], u: Optional[Tensor], scale: float, seg_offsets: Tensor,
                             seg_adapter: Tensor, need_dx: bool, grad_adapters: list[int], need_dw: bool,
                             need_db: bool) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    """(dX, [dA_a], [dB_a] for a in grad_adapters, dW, db); grads not asked for come back as empty (0,) tensors."""
    dy = dy.contiguous()
    if backend_for("lora_linear", dy, weight) == "triton":
        from dopsd_fast._kernels import lora_linear as _k

        out = _k.lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scale, seg_offsets, seg_adapter,
                                 need_dx, grad_adapters, need_dw, need_db)
    else:
        out = lora_linear_bwd_ref(dy, x, weight, lora_A, lora_B, scale, seg_offsets, seg_adapter,
                                  need_dx, grad_adapters, need_dw, need_db)
    dx, dA, dB, dw, db = out
    empty = dy.new_empty(_EMPTY)
    return (empty if dx is None else dx, dA, dB, empty.clone() if dw is None else dw,
            empty.clone() if db is None else db)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, u, scale, seg_offsets, seg_adapter, need_dx, grad_adapters, need_dw, need_db):
    def maybe(flag, shape):
        return dy.new_empty(shape if flag else _EMPTY)
    return (maybe(need_dx, (dy.shape[0], weight.shape[1])),
            [lora_A[a].new_empty(lora_A[a].shape) for a in grad_adapters],
            [lora_B[a].new_empty(lora_B[a].shape) for a in grad_adapters],
            maybe(need_dw, weight.shape), maybe(need_db, (weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, seg_offsets, seg_adapter = inputs
    _, u = output
    ctx.n = len(lora_A)
    ctx.a_grad = [a.requires_grad for a in lora_A]
    ctx.b_grad = [b.requires_grad for b in lora_B]
    ctx.grad_adapters = [i for i in range(ctx.n) if ctx.a_grad[i] or ctx.b_grad[i]]
    ctx.need_dx, ctx.need_dw = x.requires_grad, weight.requires_grad
    ctx.need_db = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.scale = scale
    # x only for dA / dW, u only for dB: a frozen-adapter, frozen-base forward keeps neither alive.
    keep_x = bool(ctx.grad_adapters) or ctx.need_dw
    ctx.save_for_backward(x if keep_x else None, u if ctx.grad_adapters else None, weight, seg_offsets, seg_adapter,
                          *lora_A, *lora_B)


def _backward(ctx, dy, du):
    x, u, weight, seg_offsets, seg_adapter, *ab = ctx.saved_tensors
    lora_A, lora_B = ab[: ctx.n], ab[ctx.n:]
    dx, dA, dB, dw, db = torch.ops.dopsd.lora_linear_backward(
        dy, x, weight, lora_A, lora_B, u, ctx.scale, seg_offsets, seg_adapter,
        ctx.need_dx, ctx.grad_adapters, ctx.need_dw, ctx.need_db)
    grad_A, grad_B = [None] * ctx.n, [None] * ctx.n
    for i, a in enumerate(ctx.grad_adapters):
        grad_A[a] = dA[i] if ctx.a_grad[a] else None
        grad_B[a] = dB[i] if ctx.b_grad[a] else None
    return (dx if ctx.need_dx else None, dw if ctx.need_dw else None,
            db.to(ctx.bias_dtype) if ctx.need_db else None, grad_A, grad_B, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _as_list(t: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return list(t.unbind(0)) if isinstance(t, Tensor) else list(t)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Sequence[Tensor] | Tensor,
                lora_B: Sequence[Tensor] | Tensor, scale: float, seg_offsets: Tensor, seg_adapter: Tensor) -> Tensor:
    """Y = X W^T + b + scale * (X_s A_a^T) B_a^T, with adapter a = seg_adapter[s] on the rows of segment s.

    Args:
        x: (..., in) float32/bfloat16/float16, any strides; the leading dims are flattened to T packed rows.
        weight: (out, in), x's dtype. bias: (out,) or None.
        lora_A: a list of n_adapters tensors (r, in); lora_B: a list of n_adapters tensors (out, r). Same r for
            all adapters; any float dtype (cast to x's dtype for the product). A stacked (n, r, in) / (n, out, r)
            tensor is accepted too (then its gradient covers all adapters at once).
        scale: alpha / r.
        seg_offsets: int32 (S+1,) on x's device; seg_offsets[0] == 0, non-decreasing, seg_offsets[-1] == T
            (not checked on the Triton path: checking would sync with the host).
        seg_adapter: int32 (S,) on x's device: index into lora_A/lora_B of segment s's adapter, -1 for none.

    Returns:
        (..., out) in x's dtype (fp32 accumulation on the Triton path).

    Differentiable in x, in every lora_A[i] / lora_B[i] that requires grad (the others get None, and no work is
    spent on them), and in weight/bias if they require grad (unfused torch matmuls: the base is meant frozen).
    Saves x only when dA or dW is needed and the (T, r) fp32 down projection U only when dB is needed.
    """
    lead = x.shape[:-1]
    y, _ = torch.ops.dopsd.lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, _as_list(lora_A),
                                       _as_list(lora_B), float(scale), seg_offsets, seg_adapter)
    return y.reshape(*lead, weight.shape[0])
