"""Fused roll-out step: Euler update, per-sample squared-error sum and its gradient in one pass (tier 1a).

Packed layout: every sample's latent is flattened and concatenated into one 1-D buffer of ``total`` elements;
sample ``b`` owns ``[cu_seqlens[b], cu_seqlens[b+1])``. Per step and element the kernel reads x, out_s, out_t once
and writes x_next (and the fp32 gradient when asked): the memory traffic of the Euler step alone plus one buffer.

Reduction: deterministic two-stage. Grid (B, P): program (b, p) walks segment b with stride P * BLOCK and writes
one fp32 partial sum to ``partials[b, p]``; a second tiny kernel sums each row of ``partials`` in a fixed order.
No atomics, so the loss is bit-reproducible run to run for a given (BLOCK, P).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import block_for, interpreting, num_warps_for, round_fp32_to

_MAX_PROGRAMS_PER_SEGMENT = 1024   # bounds the second stage to one block per sample


@triton.jit
def _rollout_step_fwd_kernel(
    x_ptr, s_ptr, t_ptr,            # (total,) any float dtype
    cu_ptr,                         # (B+1,) int32
    step_ptr, loss_ptr,             # (B,) fp32
    xn_ptr,                         # (total,) dtype of x
    g_ptr,                          # (total,) fp32, written only when WRITE_GRAD
    part_ptr,                       # (B, P) fp32 partial sums
    P,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    c_step = tl.load(step_ptr + b)
    c_loss = tl.load(loss_ptr + b)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for lo in range(start + p * BLOCK, end, P * BLOCK):
        idx = lo + offs
        m = idx < end
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + idx, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(xn_ptr + idx, round_fp32_to(x + c_step * s, xn_ptr.dtype.element_ty), mask=m)
        d = c_loss * (s - t)            # = x0_s - x0_t for the x0 loss; masked lanes give 0
        acc += d * d
        if WRITE_GRAD:
            tl.store(g_ptr + idx, 2.0 * c_loss * d, mask=m)
    tl.store(part_ptr + b * P + p, tl.sum(acc, axis=0))


@triton.jit
def _row_sum_kernel(part_ptr, out_ptr, P, BLOCK_P: tl.constexpr):
    # (B, P) fp32 -> (B,) fp32, one program per row, fixed order
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    v = tl.load(part_ptr + b * P + offs, mask=offs < P, other=0.0)
    tl.store(out_ptr + b, tl.sum(v, axis=0))


@triton.jit
def _rollout_step_bwd_kernel(g_ptr, cu_ptr, gss_ptr, out_ptr, P, BLOCK: tl.constexpr):
    # out[i] = g[i] * grad_sq_sum[b] for i in segment b, rounded once to out's dtype
    b = tl.program_id(0)
    p = tl.program_id(1)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    scale = tl.load(gss_ptr + b).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    for lo in range(start + p * BLOCK, end, P * BLOCK):
        idx = lo + offs
        m = idx < end
        g = tl.load(g_ptr + idx, mask=m, other=0.0)
        tl.store(out_ptr + idx, round_fp32_to(g * scale, out_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_shape(total: int, batch: int, device: torch.device, block: int | None, programs: int | None):
    """(BLOCK, P): P programs per segment, sized from the mean segment length (segments may differ)."""
    mean = triton.cdiv(max(total, 1), max(batch, 1))
    if block is None:
        block = block_for(mean, cap=4096 if interpreting() else 2048)
    if programs is None:
        if device.type == "cuda" and not interpreting():
            budget = max(1, 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()))
            programs = max(1, min(triton.cdiv(mean, block), budget // max(batch, 1)))
        else:
            programs = 1   # interpreter: each program instance costs ~ms, loop inside one instead
    return block, min(programs, _MAX_PROGRAMS_PER_SEGMENT)


def _check(x, out_s, out_t, cu_seqlens, step_coef, loss_coef) -> int:
    assert x.dim() == 1 and out_s.shape == x.shape and out_t.shape == x.shape, "x, out_s, out_t: (total,)"
    assert x.is_contiguous() and out_s.is_contiguous() and out_t.is_contiguous()
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.is_contiguous()
    batch = cu_seqlens.numel() - 1
    assert step_coef.shape == (batch,) and loss_coef.shape == (batch,), "step_coef, loss_coef: (B,)"
    assert step_coef.dtype == torch.float32 and loss_coef.dtype == torch.float32
    return batch


def rollout_step_fwd(x, out_s, out_t, cu_seqlens, step_coef, loss_coef, *, compute_grad: bool,
                     out=None, sq_sum=None, grad=None, block: int | None = None, programs: int | None = None):
    """Returns (x_next (total,) x.dtype, sq_sum (B,) fp32, grad (total,) fp32 or None).

    grad = d sq_sum[b] / d out_s = 2 * loss_coef[b]^2 * (out_s - out_t) on segment b (when ``compute_grad``).
    ``out``/``sq_sum``/``grad`` may be preallocated (tests poison them); ``block``/``programs`` override the
    launch shape (tests force several programs per segment to exercise the two-stage reduction).
    """
    batch = _check(x, out_s, out_t, cu_seqlens, step_coef, loss_coef)
    total = x.numel()
    x_next = torch.empty_like(x) if out is None else out
    sq = torch.empty(batch, dtype=torch.float32, device=x.device) if sq_sum is None else sq_sum
    g = None
    if compute_grad:
        g = torch.empty(total, dtype=torch.float32, device=x.device) if grad is None else grad
        assert g.shape == (total,) and g.dtype == torch.float32
    assert x_next.shape == x.shape and x_next.dtype == x.dtype and sq.shape == (batch,) and sq.dtype == torch.float32
    if batch == 0:
        return x_next, sq, g
    BLOCK, P = _launch_shape(total, batch, x.device, block, programs)
    partials = torch.empty((batch, P), dtype=torch.float32, device=x.device)
    _rollout_step_fwd_kernel[(batch, P)](
        x, out_s, out_t, cu_seqlens, step_coef, loss_coef, x_next, g if g is not None else x_next, partials, P,
        WRITE_GRAD=compute_grad, BLOCK=BLOCK, num_warps=num_warps_for(BLOCK),
    )
    _row_sum_kernel[(batch,)](partials, sq, P, BLOCK_P=triton.next_power_of_2(P), num_warps=1)
    return x_next, sq, g


def rollout_step_bwd(grad, cu_seqlens, grad_sq_sum, dtype: torch.dtype, *, out=None,
                     block: int | None = None, programs: int | None = None):
    """grad (total,) fp32 from the forward, grad_sq_sum (B,) -> d loss / d out_s (total,) in ``dtype``."""
    batch = cu_seqlens.numel() - 1
    assert grad.dim() == 1 and grad.dtype == torch.float32 and grad.is_contiguous()
    assert grad_sq_sum.shape == (batch,) and grad_sq_sum.is_contiguous()
    res = torch.empty(grad.shape, dtype=dtype, device=grad.device) if out is None else out
    assert res.shape == grad.shape and res.dtype == dtype
    if batch == 0:
        return res
    BLOCK, P = _launch_shape(grad.numel(), batch, grad.device, block, programs)
    _rollout_step_bwd_kernel[(batch, P)](grad, cu_seqlens, grad_sq_sum, res, P, BLOCK=BLOCK,
                                         num_warps=num_warps_for(BLOCK))
    return res
