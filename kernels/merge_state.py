"""Merge two partial attention states (O_i, LSE_i) over disjoint key sets into the state over their union (fwd + bwd).

Shapes: o1, o2 (T, H, D) (same dtype, last dim contiguous); lse1, lse2 fp32 (H, T) in natural-log units (the layout of
kernels/packed_attention.py). Forward, with lse = logaddexp(lse1, lse2) and w_i = exp(lse_i - lse):
    O = w1 * O1 + w2 * O2
A row with both LSE_i = -inf (no keys at all) gives O = 0, LSE = -inf (and zero gradients).
Backward (derived: dw_i/dlse_j = w_i (delta_ij - w_j)), g_i = rowsum(dO * O_i), g = rowsum(dO * O) = w1 g1 + w2 g2:
    dO_i = w_i * dO,    dLSE_i = w_i * (g_i - g + dLSE)
One program per (BLOCK_T tokens, head); everything in fp32; the backward recomputes w_i (nothing saved but inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import interpreting
from .packed_attention import _needs_rtne, _rtne_bf16


@triton.jit
def _merge_fwd_kernel(
    O1, LSE1, O2, LSE2, O, LSE, T,
    s_o1t, s_o1h, s_o2t, s_o2h, s_ot, s_oh, s_l1h, s_l1t, s_l2h, s_l2t, s_lh, s_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = rows < T
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # w_i = exp(lse_i - lse); shift by max(lse1, lse2), or by 0 when both are -inf (then w = 0, lse = -inf)
    l1 = tl.load(LSE1 + head * s_l1h + rows * s_l1t, mask=t_ok, other=float("-inf"))
    l2 = tl.load(LSE2 + head * s_l2h + rows * s_l2t, mask=t_ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    e1, e2 = tl.exp(l1 - m), tl.exp(l2 - m)
    s = e1 + e2
    s_safe = tl.where(s > 0.0, s, 1.0)
    w1, w2 = e1 / s_safe, e2 / s_safe
    o1 = tl.load(O1 + rows[:, None] * s_o1t + head * s_o1h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + rows[:, None] * s_o2t + head * s_o2h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    o = w1[:, None] * o1 + w2[:, None] * o2
    if RTNE_BF16:
        o = _rtne_bf16(o)
    tl.store(O + rows[:, None] * s_ot + head * s_oh + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + head * s_lh + rows * s_lt, tl.where(s > 0.0, m + tl.log(s_safe), float("-inf")), mask=t_ok)


@triton.jit
def _merge_bwd_kernel(
    DO, DLSE, O1, LSE1, O2, LSE2, DO1, DLSE1, DO2, DLSE2, T,
    s_dot, s_doh, s_glh, s_glt, s_o1t, s_o1h, s_o2t, s_o2h, s_l1h, s_l1t, s_l2h, s_l2t,
    s_do1t, s_do1h, s_do2t, s_do2h, s_g1h, s_g1t, s_g2h, s_g2t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = rows < T
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    l1 = tl.load(LSE1 + head * s_l1h + rows * s_l1t, mask=t_ok, other=float("-inf"))
    l2 = tl.load(LSE2 + head * s_l2h + rows * s_l2t, mask=t_ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    e1, e2 = tl.exp(l1 - m), tl.exp(l2 - m)
    s = e1 + e2
    s_safe = tl.where(s > 0.0, s, 1.0)
    w1, w2 = e1 / s_safe, e2 / s_safe
    do = tl.load(DO + rows[:, None] * s_dot + head * s_doh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = tl.load(O1 + rows[:, None] * s_o1t + head * s_o1h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + rows[:, None] * s_o2t + head * s_o2h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    g1 = tl.sum(do * o1, 1)
    g2 = tl.sum(do * o2, 1)
    g = w1 * g1 + w2 * g2  # rowsum(dO * O) with O recomputed in fp32
    if HAS_DLSE:
        g -= tl.load(DLSE + head * s_glh + rows * s_glt, mask=t_ok, other=0.0)
    do1 = w1[:, None] * do
    do2 = w2[:, None] * do
    if RTNE_BF16:
        do1 = _rtne_bf16(do1)
        do2 = _rtne_bf16(do2)
    tl.store(DO1 + rows[:, None] * s_do1t + head * s_do1h + offs_d[None, :], do1.to(DO1.dtype.element_ty), mask=mask)
    tl.store(DO2 + rows[:, None] * s_do2t + head * s_do2h + offs_d[None, :], do2.to(DO2.dtype.element_ty), mask=mask)
    tl.store(DLSE1 + head * s_g1h + rows * s_g1t, w1 * (g1 - g), mask=t_ok)
    tl.store(DLSE2 + head * s_g2h + rows * s_g2t, w2 * (g2 - g), mask=t_ok)


def _block_t(t: int, block_d: int) -> int:
    # interpreter: few programs (tiles up to 16K elements); GPU: 4K-element tiles
    cap = (16384 if interpreting() else 4096) // block_d
    return max(1, min(max(cap, 1), triton.next_power_of_2(max(t, 1))))


def _check(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    if o1.dim() != 3 or o1.shape != o2.shape or o1.dtype != o2.dtype:
        raise ValueError(f"o1, o2 must share shape (T, H, D) and dtype; got {tuple(o1.shape)} {o1.dtype}, "
                         f"{tuple(o2.shape)} {o2.dtype}")
    t, h, _ = o1.shape
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        if lse.shape != (h, t) or lse.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 (H, T) = ({h}, {t}); got {tuple(lse.shape)} {lse.dtype}")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def merge_state_fwd(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor, *,
    out: torch.Tensor | None = None, out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (T, H, D) in o1's dtype, LSE fp32 (H, T)); `out` / `out_lse` are optional preallocated outputs."""
    _check(o1, lse1, o2, lse2)
    o1, o2 = _rowmajor(o1), _rowmajor(o2)
    t, h, d = o1.shape
    out = torch.empty_like(o1) if out is None else out
    out_lse = torch.empty_like(lse1) if out_lse is None else out_lse
    assert out.shape == o1.shape and out.stride(-1) == 1 and out_lse.shape == lse1.shape
    if t == 0 or h == 0:
        return out, out_lse
    block_d = triton.next_power_of_2(d)
    block_t = _block_t(t, block_d)
    _merge_fwd_kernel[(triton.cdiv(t, block_t), h)](
        o1, lse1, o2, lse2, out, out_lse, t,
        o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1), out.stride(0), out.stride(1),
        lse1.stride(0), lse1.stride(1), lse2.stride(0), lse2.stride(1), out_lse.stride(0), out_lse.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, RTNE_BF16=_needs_rtne(out.dtype), num_warps=4,
    )
    return out, out_lse


def merge_state_bwd(
    dout: torch.Tensor, dlse: torch.Tensor | None,
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor, *,
    do1: torch.Tensor | None = None, dlse1: torch.Tensor | None = None,
    do2: torch.Tensor | None = None, dlse2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dO1, dLSE1, dO2, dLSE2) from dO (T, H, D) and dLSE fp32 (H, T) or None (= zeros)."""
    _check(o1, lse1, o2, lse2)
    o1, o2, dout = _rowmajor(o1), _rowmajor(o2), _rowmajor(dout)
    t, h, d = o1.shape
    do1 = torch.empty_like(o1) if do1 is None else do1
    do2 = torch.empty_like(o2) if do2 is None else do2
    dlse1 = torch.empty_like(lse1) if dlse1 is None else dlse1
    dlse2 = torch.empty_like(lse2) if dlse2 is None else dlse2
    assert do1.stride(-1) == 1 and do2.stride(-1) == 1
    if t == 0 or h == 0:
        return do1, dlse1, do2, dlse2
    block_d = triton.next_power_of_2(d)
    block_t = _block_t(t, block_d)
    g = dlse if dlse is not None else lse1  # dummy pointer when HAS_DLSE is False
    _merge_bwd_kernel[(triton.cdiv(t, block_t), h)](
        dout, g, o1, lse1, o2, lse2, do1, dlse1, do2, dlse2, t,
        dout.stride(0), dout.stride(1), g.stride(0), g.stride(1),
        o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
        lse1.stride(0), lse1.stride(1), lse2.stride(0), lse2.stride(1),
        do1.stride(0), do1.stride(1), do2.stride(0), do2.stride(1),
        dlse1.stride(0), dlse1.stride(1), dlse2.stride(0), dlse2.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, HAS_DLSE=dlse is not None, RTNE_BF16=_needs_rtne(do1.dtype),
        num_warps=4,
    )
    return do1, dlse1, do2, dlse2


__all__ = ["merge_state_fwd", "merge_state_bwd"]
