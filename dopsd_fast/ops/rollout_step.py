"""rollout_step: one D-OPSD roll-out step on packed samples, forward and backward in one pass (tiers 2+3).

Per step the loop needs x_next = euler(x, out_s) (no gradient) and the per-step loss MSE(student, sg(teacher)).
Both read the same three buffers, so one kernel does both and also writes d loss / d out_s (Liger fused-loss
style); the autograd backward only scales that buffer by the incoming gradient of each sample's sum.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops.reference import _rollout_segment_ids, rollout_step_grad_ref, rollout_step_ref


@torch.library.custom_op("dopsd::rollout_step", mutates_args=())
def _rollout_step_op(x: Tensor, out_s: Tensor, out_t: Tensor, cu_seqlens: Tensor, step_coef: Tensor,
                     loss_coef: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    # -> x_next (total,) x.dtype, sq_sum (B,) fp32, grad (total,) fp32 = d sq_sum / d out_s, or (0,) when not asked
    backend = backend_for("rollout_step", x, out_s, out_t, cu_seqlens)
    if backend == "cpp":
        return torch.ops.dopsd_C.rollout_step(x, out_s, out_t, cu_seqlens, step_coef, loss_coef, compute_grad)
    if backend == "triton":
        from dopsd_fast._kernels import rollout_step as _k
        x_next, sq_sum, grad = _k.rollout_step_fwd(x, out_s, out_t, cu_seqlens, step_coef, loss_coef,
                                                   compute_grad=compute_grad)
    else:
        x_next, sq_sum = rollout_step_ref(x, out_s, out_t, cu_seqlens, step_coef, loss_coef)
        grad = rollout_step_grad_ref(out_s, out_t, cu_seqlens, loss_coef) if compute_grad else None
    if grad is None:
        grad = x.new_empty((0,), dtype=torch.float32)
    return x_next, sq_sum, grad


@_rollout_step_op.register_fake
def _(x, out_s, out_t, cu_seqlens, step_coef, loss_coef, compute_grad):
    batch = cu_seqlens.shape[0] - 1
    grad_len = x.shape[0] if compute_grad else 0
    return (torch.empty_like(x), x.new_empty((batch,), dtype=torch.float32),
            x.new_empty((grad_len,), dtype=torch.float32))


@torch.library.custom_op("dopsd::rollout_step_backward", mutates_args=())
def _rollout_step_backward_op(grad: Tensor, cu_seqlens: Tensor, grad_sq_sum: Tensor, dtype: torch.dtype) -> Tensor:
    # grad (total,) fp32 from the forward, grad_sq_sum (B,) -> d loss / d out_s (total,) in dtype
    grad_sq_sum = grad_sq_sum.float().contiguous()
    backend = backend_for("rollout_step", grad, cu_seqlens, grad_sq_sum)
    if backend == "cpp":
        return torch.ops.dopsd_C.rollout_step_backward(grad, cu_seqlens, grad_sq_sum, dtype)
    if backend == "triton":
        from dopsd_fast._kernels import rollout_step as _k
        return _k.rollout_step_bwd(grad, cu_seqlens, grad_sq_sum, dtype)
    return (grad * grad_sq_sum[_rollout_segment_ids(cu_seqlens, grad.numel())]).to(dtype)


@_rollout_step_backward_op.register_fake
def _(grad, cu_seqlens, grad_sq_sum, dtype):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    out_s, compute_grad = inputs[1], inputs[6]
    x_next, _, grad = output
    ctx.mark_non_differentiable(x_next, grad)   # only sq_sum carries gradient, and only to out_s
    ctx.out_s_dtype = out_s.dtype
    if compute_grad:
        ctx.save_for_backward(grad, inputs[3])
    ctx.has_grad = compute_grad


def _backward(ctx, _g_x_next, g_sq_sum, _g_grad):
    if g_sq_sum is None or not ctx.needs_input_grad[1]:
        return None, None, None, None, None, None, None
    if not ctx.has_grad:
        raise RuntimeError("dopsd::rollout_step ran with compute_grad=False: call the functional rollout_step()")
    grad, cu_seqlens = ctx.saved_tensors
    g_out_s = _rollout_step_backward_op(grad, cu_seqlens, g_sq_sum, ctx.out_s_dtype)
    return None, g_out_s, None, None, None, None, None


_rollout_step_op.register_autograd(_backward, setup_context=_setup_context)


def rollout_step(x: Tensor, out_s: Tensor, out_t: Tensor, cu_seqlens: Tensor, step_coef: Tensor,
                 loss_coef: Tensor) -> tuple[Tensor, Tensor]:
    """Euler step from the student and per-sample squared error to the stopped teacher, in one pass.

    Args:
        x, out_s, out_t: (total,) contiguous, any float dtype: the state and the student / teacher model outputs,
            every sample's latent flattened and concatenated; sample b owns [cu_seqlens[b], cu_seqlens[b+1]).
        cu_seqlens: int32 (B+1,), cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total (same device).
        step_coef: fp32 (B,), sign * (sigma_b - sigma_next_b)   (FlowConvention.euler).
        loss_coef: fp32 (B,), sign * sigma_b for the x0-space loss, 1.0 for the velocity loss.

    Returns:
        x_next: (total,) x.dtype = x + step_coef[b] * out_s, fp32 math rounded once. Never requires grad.
        sq_sum: fp32 (B,) = sum over segment b of (loss_coef[b] * (out_s - out_t))^2, accumulated in fp32.
            Differentiable in out_s only (no gradient to x, out_t or the coefficients). The mean-squared loss of
            the released code is ``sq_sum.sum() / total``.

    For the x0 loss, x0_s - x0_t = (x + c*out_s) - (x + c*out_t) with c = sign*sigma; this op forms c*(out_s - out_t)
    directly, which is the exact difference, while the released code rounds x0_s and x0_t first. The two agree
    to ~ eps(dtype) * |x| / |c*(out_s - out_t)| per element (1e-6 relative on the loss in fp32 for unit-scale
    data; in bf16 the released loss carries bf16 rounding, this one does not).
    When out_s requires grad, d sq_sum[b] / d out_s = 2 loss_coef[b]^2 (out_s - out_t) is written in the same
    pass into an fp32 (total,) buffer kept for backward; backward scales it by grad_sq_sum[b] and rounds once to
    out_s.dtype. Reduction is a deterministic two-stage sum (no atomics).
    """
    compute_grad = torch.is_grad_enabled() and out_s.requires_grad
    x_next, sq_sum, _ = _rollout_step_op(x, out_s, out_t, cu_seqlens, step_coef, loss_coef, compute_grad)
    return x_next, sq_sum


def rollout_coefs(sign: int, sigma: Tensor | float, sigma_next: Tensor | float, kind: Literal["x0", "velocity"],
                  batch: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(step_coef, loss_coef), fp32 (B,), for a FlowConvention ``sign`` and per-sample or shared sigmas."""
    if kind not in ("x0", "velocity"):
        raise ValueError(f"loss kind {kind!r}: expected x0 or velocity")
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)):
        # shared sigmas: the same fp64 maths on the host, rounded once to fp32 by the fill; a fill takes its value
        # as a kernel argument, where a tensor built from host numbers is a host->device copy that waits for the device
        full = functools.partial(torch.full, (batch,), dtype=torch.float32, device=device)
        return full(sign * (float(sigma) - float(sigma_next))), full(sign * float(sigma) if kind == "x0" else 1.0)
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=device).expand(batch)
    nxt = torch.as_tensor(sigma_next, dtype=torch.float64, device=device).expand(batch)
    step = (sign * (sig - nxt)).float()
    loss = (sign * sig).float() if kind == "x0" else torch.ones(batch, dtype=torch.float32, device=sig.device)
    return step.contiguous(), loss.contiguous()
