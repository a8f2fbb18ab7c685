"""merge_state: combine two partial attention states (O_i, LSE_i) over disjoint key sets (tiers 2+3).

Used by prefix attention (queries vs a shared KV prefix, and vs their own KV suffix), like flash-attn's split-KV
combine or flashinfer's merge_state, but differentiable w.r.t. all four inputs (training backward derived in
kernels/merge_state.py and dopsd_fast.ops.reference.merge_state_bwd_ref).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops.reference import merge_state_bwd_ref, merge_state_ref


@torch.library.custom_op("dopsd::merge_state", mutates_args=())
def _merge_state_op(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    if backend_for("merge_state", o1, lse1, o2, lse2) == "triton":
        from dopsd_fast._kernels import merge_state as _k
        return _k.merge_state_fwd(o1, lse1, o2, lse2)
    out, lse = merge_state_ref(o1, lse1, o2, lse2)
    return out.contiguous(), lse.contiguous()


@_merge_state_op.register_fake
def _(o1, lse1, o2, lse2):
    return torch.empty_like(o1), torch.empty_like(lse1)


@torch.library.custom_op("dopsd::merge_state_backward", mutates_args=())
def _merge_state_backward_op(dout: Tensor, dlse: Tensor | None, o1: Tensor, lse1: Tensor, o2: Tensor,
                             lse2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend_for("merge_state", dout, o1, lse1, o2, lse2) == "triton":
        from dopsd_fast._kernels import merge_state as _k
        return _k.merge_state_bwd(dout, dlse, o1, lse1, o2, lse2)
    return tuple(t.contiguous() for t in merge_state_bwd_ref(dout, dlse, o1, lse1, o2, lse2))


@_merge_state_backward_op.register_fake
def _(dout, dlse, o1, lse1, o2, lse2):
    return torch.empty_like(o1), torch.empty_like(lse1), torch.empty_like(o2), torch.empty_like(lse2)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # o1, lse1, o2, lse2: the backward recomputes the weights


def _backward(ctx, g_out, g_lse):
    o1, lse1, o2, lse2 = ctx.saved_tensors
    if g_out is None:
        g_out = torch.zeros_like(o1)
    do1, dlse1, do2, dlse2 = _merge_state_backward_op(g_out, g_lse, o1, lse1, o2, lse2)
    return do1, dlse1, do2, dlse2


_merge_state_op.register_autograd(_backward, setup_context=_setup_context)


def merge_state(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Attention state over the union of two disjoint key sets, from the two partial states.

    Args:
        o1, o2: (T, H, D) partial outputs (softmax-normalised over their own keys), one dtype (fp32/fp16/bf16),
            same device.
        lse1, lse2: fp32 (H, T) log-sum-exp of the scaled scores over each key set, natural-log units; -inf where a
            key set is empty for that row (the layout returned by packed_attention_with_lse).

    Returns:
        (O (T, H, D) in o1's dtype, LSE fp32 (H, T)): LSE = logaddexp(lse1, lse2),
        O = exp(lse1 - LSE) * o1 + exp(lse2 - LSE) * o2, fp32 math rounded once. Both LSE_i = -inf gives O = 0,
        LSE = -inf. Differentiable w.r.t. o1, lse1, o2, lse2 through O and LSE:
        dO_i = w_i dO, dLSE_i = w_i (rowsum(dO * O_i) - rowsum(dO * O) + dLSE), w_i = exp(lse_i - LSE).
    """
    return _merge_state_op(o1, lse1, o2, lse2)


__all__ = ["merge_state"]
