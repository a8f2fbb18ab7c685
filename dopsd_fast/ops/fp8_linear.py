"""A frozen linear layer on an FP8 (e4m3) weight with per-output-row scales (tiers 2+3).

``model.base_precision=fp8`` stores the frozen base of every LoRA linear this way (``LoRALinear.quantize_base``):
1 byte a weight instead of bf16's 2, quantised once at load and shared by teacher and student.

Forward: the activations are quantised per row (token) to e4m3 on the fly and one row-wise scaled FP8 GEMM runs,
``torch._scaled_mm`` on CUDA devices of compute capability 8.9+ (cuBLAS on Hopper), with fp32 accumulation and the
scales applied to the fp32 sums. Everywhere else (CPU, older GPUs, sizes not multiples of 16, ops_backend=reference)
the emulation ``ops.reference.fp8_linear_ref`` computes the same quantised products in fp32. Both quantise with the
one function ``quantize_rowwise``, so their FP8 operands are bit-identical; the results differ by summation order.

Backward: only dX (the base is frozen; LoRA's gradients come from its own bf16 GEMMs in LoRALinear). ``input_grad``
picks its GEMM: "bf16" on the weight dequantised to dy's dtype, or "e5m2", dY quantised per row to e5m2 with W's
row scales folded into it first (they lie along dX = dY W's reduction dimension) against the unscaled e4m3 weight.

Why torch._scaled_mm and not torchao: torchao's float8 *training* (Float8Linear) keeps the bf16 weight and casts it
every forward (no memory saved, the frozen weight re-quantised each call); its *inference* Float8Tensor keeps e4m3
weights with row scales, but as a tensor subclass whose backward through the weight is not part of its contract
(torchao 0.18: linear/mm dispatch, the gradient GEMM would need W's row scales on the reduction dimension). What we
need is these ~40 lines on a public torch op: no extra dependency, no wheel to carry.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import requested_backend
from dopsd_fast.ops.reference import fp8_linear_input_grad_ref, fp8_linear_ref, quantize_rowwise

INPUT_GRADS = ("bf16", "e5m2")
# torchao's float8 defaults: the output GEMM with Hopper's fast accumulation (partial sums promoted to fp32 less
# often), the gradient GEMM without it.
FAST_ACCUM_FORWARD, FAST_ACCUM_GRAD = True, False


def scaled_mm_ok(x: Tensor, weight: Tensor) -> bool:
    """Whether the torch._scaled_mm path runs: CUDA sm89+, in/out multiples of 16 (its constraint), not forced off."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and requested_backend() != "reference")


def fp8_linear_scaled_mm(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """fp8_linear_ref's result through torch._scaled_mm; x (T, in) -> (T, out) in x's dtype."""
    xq, x_scale = quantize_rowwise(x)
    # b = Wq^T as a column-major (in, out) view, the layout the FP8 GEMM wants; scales (T, 1) and (1, out)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.unsqueeze(-1), scale_b=weight_scale.unsqueeze(0),
                         out_dtype=x.dtype, use_fast_accum=FAST_ACCUM_FORWARD)
    return y if bias is None else y + bias


def fp8_linear_input_grad_scaled_mm(dy: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """fp8_linear_input_grad_ref(..., "e5m2") through torch._scaled_mm; dy (T, out) -> (T, in) in dy's dtype."""
    gq, g_scale = quantize_rowwise(dy.float() * weight_scale, torch.float8_e5m2)
    # b = Wq (out, in) column-major: a transposed copy of the e4m3 weight, 1 byte a weight, freed after this GEMM
    ones = torch.ones(1, weight.shape[1], device=dy.device)
    return torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=g_scale.unsqueeze(-1), scale_b=ones,
                            out_dtype=dy.dtype, use_fast_accum=FAST_ACCUM_GRAD)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_grad: str) -> Tensor:
        fast = scaled_mm_ok(x, weight)
        ctx.fast, ctx.input_grad = fast, input_grad
        ctx.save_for_backward(weight, weight_scale)
        return (fp8_linear_scaled_mm if fast else fp8_linear_ref)(x, weight, weight_scale, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        weight, weight_scale = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.input_grad == "e5m2" and ctx.fast:
            dx = fp8_linear_input_grad_scaled_mm(dy, weight, weight_scale)
        else:
            dx = fp8_linear_input_grad_ref(dy, weight, weight_scale, ctx.input_grad)
        return dx, None, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
               input_grad: str = "bf16") -> Tensor:
    """Y = (X W^T) + b for a frozen e4m3 weight W = Wq * scale[:, None].

    Args:
        x: (..., in) float32/bfloat16; the leading dims are flattened to T rows, each quantised to e4m3 with its own
            scale (row amax / 448).
        weight: (out, in) torch.float8_e4m3fn; weight_scale: (out,) fp32, as ``quantize_rowwise`` returns them.
        bias: (out,) in x's dtype, or None. Weight, scale and bias get no gradient (a frozen base).
        input_grad: "bf16" | "e5m2", the precision of dX's GEMM (module docstring).

    Returns:
        (..., out) in x's dtype. Differentiable in x only.
    """
    if input_grad not in INPUT_GRADS:
        raise ValueError(f"input_grad={input_grad!r}: expected one of {INPUT_GRADS}")
    lead = x.shape[:-1]
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, weight_scale, bias, input_grad)
    return y.reshape(*lead, weight.shape[0])
