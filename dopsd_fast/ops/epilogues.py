"""Block epilogues (tiers 2+3): custom ops with autograd, and the public functional API.

Each op is ``torch.library.custom_op("dopsd::<op>")`` (compile-safe: ``register_fake`` gives shapes and dtypes)
whose body runs the csrc/ extension (``dopsd_C::<op>``, all but modulated_layer_norm), the Triton launcher
(dopsd_fast/_kernels/epilogues.py) or the pure-PyTorch spec
(dopsd_fast/ops/reference.py), chosen by ``_dispatch.backend_for``. Its backward is another custom op,
``dopsd::<op>_backward``, dispatched the same way; the reference backend uses the explicit fp32 ``*_backward_ref``
formulas (autograd cannot run inside a custom op body). Only inputs are saved for backward (the RMS/LayerNorm
statistics are recomputed), and gradients of weights and modulation vectors are only computed when required.
Eager calls run the same bodies through a ``torch.autograd.Function`` (under no_grad, the bodies alone) instead of
the custom ops (``_eager.py``: a third of the host time per call); under ``torch.compile`` the custom ops are what
dynamo sees.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dopsd_fast.ops import reference as ref
from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops._eager import eager_path

__all__ = ["modulated_rms_norm", "gated_residual", "qk_norm_rope", "modulated_layer_norm"]


def _kernels():
    from dopsd_fast._kernels import epilogues  # imports triton: only on the triton backend

    return epilogues


def _tensors(*ts: Tensor | None) -> list[Tensor]:
    return [t for t in ts if t is not None]


def _check_modulation(v: Tensor, x: Tensor, sample_index: Tensor | None, name: str) -> None:
    if v.dim() != 2 or v.shape[1] != x.shape[-1]:
        raise ValueError(f"{name} must be (B, {x.shape[-1]}), got {tuple(v.shape)}")
    if v.shape[0] > 1 and (sample_index is None or sample_index.dtype != torch.int64
                           or sample_index.shape != (x.shape[0],)):
        raise ValueError(f"{name} has B={v.shape[0]} rows: sample_index must be int64 ({x.shape[0]},)")


def _check_rows(x: Tensor, d: int | None = None) -> None:
    if x.dim() != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"expected packed tokens (T, {d or 'D'}), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------- modulated RMSNorm
def _mrn_fwd(x: Tensor, weight: Tensor, scale: Tensor, sample_index: Optional[Tensor], eps: float) -> Tensor:
    backend = backend_for("modulated_rms_norm", *_tensors(x, weight, scale, sample_index))
    if backend == "cpp":
        return torch.ops.dopsd_C.modulated_rms_norm(x, weight, scale, sample_index, eps)
    if backend == "triton":
        return _kernels().modulated_rms_norm_fwd(x, weight, scale, sample_index, eps)
    return ref.modulated_rms_norm_ref(x, weight, scale, sample_index, eps).contiguous()


_modulated_rms_norm = torch.library.custom_op("dopsd::modulated_rms_norm", _mrn_fwd, mutates_args=())


@_modulated_rms_norm.register_fake
def _(x, weight, scale, sample_index, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(ref.rms_norm_dtype(weight.dtype), scale.dtype))


def _mrn_bwd(grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor, sample_index: Optional[Tensor],
             eps: float, need_weight: bool, need_scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    backend = backend_for("modulated_rms_norm", *_tensors(grad, x, weight, scale, sample_index))
    if backend == "cpp":
        return torch.ops.dopsd_C.modulated_rms_norm_backward(grad, x, weight, scale, sample_index, eps, need_weight,
                                                             need_scale)
    if backend == "triton":
        dx, dw, ds = _kernels().modulated_rms_norm_bwd(grad, x, weight, scale, sample_index, eps,
                                                       need_weight=need_weight, need_scale=need_scale)
    else:
        dx, dw, ds = ref.modulated_rms_norm_backward_ref(grad, x, weight, scale, sample_index, eps,
                                                         need_weight=need_weight, need_scale=need_scale)
    return (dx.contiguous(), dw if need_weight else weight.new_empty(0),
            ds.contiguous() if need_scale else scale.new_empty(0))


_modulated_rms_norm_backward = torch.library.custom_op("dopsd::modulated_rms_norm_backward", _mrn_bwd, mutates_args=())


@_modulated_rms_norm_backward.register_fake
def _(grad, x, weight, scale, sample_index, eps, need_weight, need_scale):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape if need_weight else 0),
            scale.new_empty(scale.shape if need_scale else 0))


def _mrn_setup(ctx, inputs, output):
    x, weight, scale, sample_index, ctx.eps = inputs
    ctx.save_for_backward(x, weight, scale, sample_index)


def _mrn_grads(backward):
    """The autograd formula over ``backward``: the backward op (compiled) or its body (eager)."""
    def grads(ctx, grad):
        x, weight, scale, sample_index = ctx.saved_tensors
        _, need_w, need_s = ctx.needs_input_grad[:3]
        dx, dw, ds = backward(grad, x, weight, scale, sample_index, ctx.eps, need_w, need_s)
        return dx, dw if need_w else None, ds if need_s else None, None, None

    return grads


_modulated_rms_norm.register_autograd(_mrn_grads(_modulated_rms_norm_backward), setup_context=_mrn_setup)
_mrn = eager_path(_modulated_rms_norm, _mrn_fwd, _mrn_setup, _mrn_grads(_mrn_bwd))


def modulated_rms_norm(x: Tensor, weight: Tensor, scale: Tensor, sample_index: Tensor | None = None,
                       eps: float = 1e-5) -> Tensor:
    """``RMSNorm(x) * weight * (1 + scale[sample_index])``: Z-Image's ``attention_norm1(x) * scale_msa`` prologue.

    Args:
        x: (T, D) packed tokens, any float dtype, unit stride along D (row stride free).
        weight: (D,) RMSNorm weight.
        scale: (B, D) raw adaLN output (the ``1 +`` is part of the op); B == 1 broadcasts to every token.
        sample_index: int64 (T,) sample of each token, values in [0, B); required when B > 1, ignored when B == 1.
        eps: added to mean(x^2) (Z-Image norm_eps 1e-5).

    Returns (T, D), contiguous, in ``promote(rms_norm_dtype(weight.dtype), scale.dtype)`` (the model's dtype:
    bf16 for a bf16 model, fp32 when the norm weight is fp32). Statistics in fp32.
    Differentiable in x, weight and scale.
    """
    _check_rows(x)
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be ({x.shape[1]},), got {tuple(weight.shape)}")
    _check_modulation(scale, x, sample_index, "scale")
    return _mrn(x, weight, scale, sample_index, float(eps))


# -------------------------------------------------------------------------------------- gated RMSNorm residual
def _gr_fwd(x: Tensor, a: Tensor, weight: Tensor, gate: Tensor, sample_index: Optional[Tensor],
            eps: float) -> Tensor:
    backend = backend_for("gated_residual", *_tensors(x, a, weight, gate, sample_index))
    if backend == "cpp":
        return torch.ops.dopsd_C.gated_residual(x, a, weight, gate, sample_index, eps)
    if backend == "triton":
        return _kernels().gated_residual_fwd(x, a, weight, gate, sample_index, eps)
    return ref.gated_residual_ref(x, a, weight, gate, sample_index, eps).contiguous()


def _gated_residual_dtype(x: Tensor, weight: Tensor, gate: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.promote_types(gate.dtype, ref.rms_norm_dtype(weight.dtype)))


_gated_residual = torch.library.custom_op("dopsd::gated_residual", _gr_fwd, mutates_args=())


@_gated_residual.register_fake
def _(x, a, weight, gate, sample_index, eps):
    return x.new_empty(x.shape, dtype=_gated_residual_dtype(x, weight, gate))


def _gr_bwd(grad: Tensor, a: Tensor, weight: Tensor, gate: Tensor, sample_index: Optional[Tensor],
            eps: float, need_weight: bool, need_gate: bool) -> tuple[Tensor, Tensor, Tensor]:
    backend = backend_for("gated_residual", *_tensors(grad, a, weight, gate, sample_index))
    if backend == "cpp":
        return torch.ops.dopsd_C.gated_residual_backward(grad, a, weight, gate, sample_index, eps, need_weight,
                                                         need_gate)
    if backend == "triton":
        da, dw, dg = _kernels().gated_residual_bwd(grad, a, weight, gate, sample_index, eps,
                                                   need_weight=need_weight, need_gate=need_gate)
    else:  # dx = grad is the caller's: pass grad as the x the spec only takes the dtype of
        _, da, dw, dg = ref.gated_residual_backward_ref(grad, grad, a, weight, gate, sample_index, eps,
                                                        need_weight=need_weight, need_gate=need_gate)
    return (da.contiguous(), dw if need_weight else weight.new_empty(0),
            dg.contiguous() if need_gate else gate.new_empty(0))


_gated_residual_backward = torch.library.custom_op("dopsd::gated_residual_backward", _gr_bwd, mutates_args=())


@_gated_residual_backward.register_fake
def _(grad, a, weight, gate, sample_index, eps, need_weight, need_gate):
    return (a.new_empty(a.shape), weight.new_empty(weight.shape if need_weight else 0),
            gate.new_empty(gate.shape if need_gate else 0))


def _gr_setup(ctx, inputs, output):
    x, a, weight, gate, sample_index, ctx.eps = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(a, weight, gate, sample_index)  # x is not needed: d out / d x = 1


def _gr_grads(backward):
    """The autograd formula over ``backward``: the backward op (compiled) or its body (eager)."""
    def grads(ctx, grad):
        a, weight, gate, sample_index = ctx.saved_tensors
        need_x, _, need_w, need_g = ctx.needs_input_grad[:4]
        da, dw, dg = backward(grad, a, weight, gate, sample_index, ctx.eps, need_w, need_g)
        dx = grad.to(ctx.x_dtype) if need_x else None
        return dx, da, dw if need_w else None, dg if need_g else None, None, None

    return grads


_gated_residual.register_autograd(_gr_grads(_gated_residual_backward), setup_context=_gr_setup)
_gr = eager_path(_gated_residual, _gr_fwd, _gr_setup, _gr_grads(_gr_bwd))


def gated_residual(x: Tensor, a: Tensor, weight: Tensor, gate: Tensor, sample_index: Tensor | None = None,
                   eps: float = 1e-5) -> Tensor:
    """``x + tanh(gate[sample_index]) * RMSNorm(a) * weight``: Z-Image's ``x + gate_msa * attention_norm2(a)``
    with the tanh of the raw adaLN gate folded in.

    Args:
        x: (T, D) residual stream; a: (T, D) branch output (attention or FFN); both unit stride along D.
        weight: (D,) RMSNorm weight of ``a``.
        gate: (B, D) raw adaLN output (before tanh); B == 1 broadcasts to every token.
        sample_index: int64 (T,) in [0, B); required when B > 1, ignored when B == 1.
        eps: RMSNorm eps (Z-Image 1e-5).

    Returns (T, D), contiguous, in ``promote(x.dtype, gate.dtype, rms_norm_dtype(weight.dtype))`` (a new tensor;
    x is not modified). Differentiable in x, a, weight and gate.
    """
    _check_rows(x)
    _check_rows(a, x.shape[1])
    if a.shape != x.shape or weight.shape != (x.shape[1],):
        raise ValueError(f"a {tuple(a.shape)} / weight {tuple(weight.shape)} do not fit x {tuple(x.shape)}")
    _check_modulation(gate, x, sample_index, "gate")
    return _gr(x, a, weight, gate, sample_index, float(eps))


# ------------------------------------------------------------------------------------- qk RMSNorm + RoPE
def _qk_fwd(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
            eps: float) -> tuple[Tensor, Tensor]:
    backend = backend_for("qk_norm_rope", q, k, q_weight, k_weight, cos, sin)
    if backend == "cpp":
        return torch.ops.dopsd_C.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    if backend == "triton":
        return _kernels().qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps)
    oq, ok = ref.qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps)
    return oq.contiguous(), ok.contiguous()


_qk_norm_rope = torch.library.custom_op("dopsd::qk_norm_rope", _qk_fwd, mutates_args=())


@_qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    return (q.new_empty(q.shape, dtype=ref.rms_norm_dtype(q_weight.dtype)),
            k.new_empty(k.shape, dtype=ref.rms_norm_dtype(k_weight.dtype)))


def _qk_bwd(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
            cos: Tensor, sin: Tensor, eps: float,
            need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = backend_for("qk_norm_rope", grad_q, grad_k, q, k, q_weight, k_weight, cos, sin)
    if backend == "cpp":
        return torch.ops.dopsd_C.qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps,
                                                       need_weight)
    if backend == "triton":
        dq, dk, dqw, dkw = _kernels().qk_norm_rope_bwd(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps,
                                                        need_weight=need_weight)
    else:
        dq, dk, dqw, dkw = ref.qk_norm_rope_backward_ref(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps,
                                                         need_weight=need_weight)
    if not need_weight:
        dqw, dkw = q_weight.new_empty(0), k_weight.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dqw, dkw


_qk_norm_rope_backward = torch.library.custom_op("dopsd::qk_norm_rope_backward", _qk_bwd, mutates_args=())


@_qk_norm_rope_backward.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, need_weight):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape if need_weight else 0),
            k_weight.new_empty(k_weight.shape if need_weight else 0))


def _qk_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, ctx.eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)


def _qk_grads(backward):
    """The autograd formula over ``backward``: the backward op (compiled) or its body (eager)."""
    def grads(ctx, grad_q, grad_k):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        need_qw, need_kw = ctx.needs_input_grad[2:4]
        # Autograd passes None for an output whose gradient is zero (e.g. only q used downstream).
        grad_q = torch.zeros_like(q, dtype=ref.rms_norm_dtype(q_weight.dtype)) if grad_q is None else grad_q
        grad_k = torch.zeros_like(k, dtype=ref.rms_norm_dtype(k_weight.dtype)) if grad_k is None else grad_k
        dq, dk, dqw, dkw = backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, ctx.eps,
                                                  need_qw or need_kw)
        return dq, dk, dqw if need_qw else None, dkw if need_kw else None, None, None, None

    return grads


_qk_norm_rope.register_autograd(_qk_grads(_qk_norm_rope_backward), setup_context=_qk_setup)
_qk = eager_path(_qk_norm_rope, _qk_fwd, _qk_setup, _qk_grads(_qk_bwd))


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                 eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm then RoPE of q and k in one pass: ZImageAttention's ``apply_rope(norm_q(q), cos, sin)``
    and the same for k (FLUX.2: RMS_q / RMS_k then rope, eps 1e-6).

    Args:
        q: (T, Hq, head_dim), k: (T, Hk, head_dim); unit stride along head_dim, any token / head strides (views
            of a fused qkv projection are fine). head_dim even.
        q_weight, k_weight: (head_dim,) per-head RMSNorm weights (shared by all heads).
        cos, sin: fp32 (T, head_dim / 2): the rotation of pair i = (2i, 2i+1) (ADJACENT pairs, as complex
            numbers re + i*im) of token t. Not differentiated.
        eps: Z-Image QK_NORM_EPS 1e-5; FLUX.2 1e-6.

    Returns (q', k'), contiguous, shapes of q and k, in ``rms_norm_dtype(q_weight.dtype)`` /
    ``rms_norm_dtype(k_weight.dtype)`` (the model's apply_rope keeps the norm output's dtype). Rotation in fp32.
    Differentiable in q, k, q_weight, k_weight.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[2] % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: expected (T, H, head_dim), same T, even head_dim")
    hd = q.shape[2]
    if q_weight.shape != (hd,) or k_weight.shape != (hd,):
        raise ValueError(f"q_weight / k_weight must be ({hd},)")
    if cos.shape != (q.shape[0], hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos / sin must be ({q.shape[0]}, {hd // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("cos / sin must be fp32")
    return _qk(q, k, q_weight, k_weight, cos, sin, float(eps))


# ----------------------------------------------------------------------------------------- modulated LayerNorm
def _mln_fwd(x: Tensor, shift: Optional[Tensor], scale: Tensor, sample_index: Optional[Tensor],
             eps: float) -> Tensor:
    if backend_for("modulated_layer_norm", *_tensors(x, shift, scale, sample_index)) == "triton":
        return _kernels().modulated_layer_norm_fwd(x, shift, scale, sample_index, eps)
    return ref.modulated_layer_norm_ref(x, shift, scale, sample_index, eps).contiguous()


def _mln_dtype(x: Tensor, shift: Tensor | None, scale: Tensor) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, scale.dtype)
    return dtype if shift is None else torch.promote_types(dtype, shift.dtype)


_modulated_layer_norm = torch.library.custom_op("dopsd::modulated_layer_norm", _mln_fwd, mutates_args=())


@_modulated_layer_norm.register_fake
def _(x, shift, scale, sample_index, eps):
    return x.new_empty(x.shape, dtype=_mln_dtype(x, shift, scale))


def _mln_bwd(grad: Tensor, x: Tensor, shift: Optional[Tensor], scale: Tensor,
             sample_index: Optional[Tensor], eps: float, need_scale: bool,
             need_shift: bool) -> tuple[Tensor, Tensor, Tensor]:
    if backend_for("modulated_layer_norm", *_tensors(grad, x, shift, scale, sample_index)) == "triton":
        dx, ds, dsh = _kernels().modulated_layer_norm_bwd(grad, x, scale, sample_index, eps, need_scale=need_scale,
                                                          need_shift=need_shift,
                                                          shift_dtype=None if shift is None else shift.dtype)
    else:
        dx, dsh, ds = ref.modulated_layer_norm_backward_ref(grad, x, shift, scale, sample_index, eps,
                                                            need_scale=need_scale, need_shift=need_shift)
    empty = scale.new_empty(0)
    return dx.contiguous(), ds.contiguous() if need_scale else empty, dsh.contiguous() if need_shift else empty.clone()


_modulated_layer_norm_backward = torch.library.custom_op("dopsd::modulated_layer_norm_backward", _mln_bwd, mutates_args=())


@_modulated_layer_norm_backward.register_fake
def _(grad, x, shift, scale, sample_index, eps, need_scale, need_shift):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape if need_scale else 0),
            shift.new_empty(shift.shape) if need_shift else scale.new_empty(0))


def _mln_setup(ctx, inputs, output):
    x, shift, scale, sample_index, ctx.eps = inputs
    ctx.save_for_backward(x, shift, scale, sample_index)


def _mln_grads(backward):
    """The autograd formula over ``backward``: the backward op (compiled) or its body (eager)."""
    def grads(ctx, grad):
        x, shift, scale, sample_index = ctx.saved_tensors
        _, need_shift, need_scale = ctx.needs_input_grad[:3]
        need_shift = bool(need_shift and shift is not None)
        dx, ds, dsh = backward(grad, x, shift, scale, sample_index, ctx.eps, need_scale, need_shift)
        return dx, dsh if need_shift else None, ds if need_scale else None, None, None

    return grads


_modulated_layer_norm.register_autograd(_mln_grads(_modulated_layer_norm_backward), setup_context=_mln_setup)
_mln = eager_path(_modulated_layer_norm, _mln_fwd, _mln_setup, _mln_grads(_mln_bwd))


def modulated_layer_norm(x: Tensor, shift: Tensor | None, scale: Tensor, sample_index: Tensor | None = None,
                         eps: float = 1e-6) -> Tensor:
    """``LayerNorm(x) * (1 + scale[sample_index]) + shift[sample_index]`` (LayerNorm without affine):
    FLUX.2's ``(1 + scale) * LN(x) + shift``; with ``shift=None`` Z-Image's final layer ``LN(x) * (1 + scale)``.

    Args:
        x: (T, D) packed tokens, unit stride along D.
        shift: None or (B, D); scale: (B, D) raw modulation (the ``1 +`` is part of the op). B == 1 broadcasts.
        sample_index: int64 (T,) in [0, B); required when B > 1, ignored when B == 1.
        eps: LayerNorm eps (FLUX.2 and Z-Image's final layer: 1e-6). Biased variance, fp32 statistics.

    Returns (T, D), contiguous, in ``promote(x.dtype, scale.dtype, shift.dtype)``.
    Differentiable in x, shift and scale.
    """
    _check_rows(x)
    _check_modulation(scale, x, sample_index, "scale")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} must match scale {tuple(scale.shape)}")
    return _mln(x, shift, scale, sample_index, float(eps))
