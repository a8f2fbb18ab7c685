"""One base GEMM over packed rows + a per-segment LoRA term added in the same output tile (tier 1a).

Rows of ``inp`` (T, K) are split into contiguous segments by ``seg_offsets`` int32 (S+1,); segment s uses
adapter ``a = seg_adapter[s]`` (int32 (S,), -1 = no LoRA). Both kernels compute one generic product, so the
forward and the dX backward share them:

    Z[t, :]   = inp[t, :] @ M_a                          (_down_kernel: (T, R) fp32, 0 on rows without adapter)
    out[t, :] = inp[t, :] @ Wop + bias + scale * Z[t, :] @ Up_a   (_gemm_lora_kernel: the big GEMM, one pass)

    forward: inp = X (T, in),   Wop = W^T,  M_a = A_a^T,  Up_a = B_a^T   -> out = Y,  Z = U = X A_a^T
    dX:      inp = dY (T, out), Wop = W,    M_a = B_a,    Up_a = A_a     -> out = dX, Z = V = dY B_a

The rank-R term needs Z of a whole row block, so Z comes from its own (cheap, ~R/N of the FLOPs) launch before
the GEMM; recomputing it in every (m, n) tile would cost R/BLOCK_N (~50 %) extra MMA work. The GEMM epilogue
loops over the segments overlapping its row block (usually one or two), masks Z to the segment's rows and adds
Z_seg @ Up_a in fp32 before the single store. Launchers take tensors and return tensors; no autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._config import block_for, interpreting


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # The interpreter's tl.dot returns garbage on bf16 operands (triton #11584): fp32 operands there.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _down_kernel(inp, mat, z, seg_off, seg_ad, T, K, R, S,
                 s_it, s_ik,            # inp (T, K)
                 s_ma, s_mk, s_mr,      # M_a[k, r] at mat + a * s_ma + k * s_mk + r * s_mr
                 s_zt, s_zr,            # z (T, R) fp32
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_F32: tl.constexpr, PREC: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(S):
        lo = tl.load(seg_off + s)
        hi = tl.load(seg_off + s + 1)
        a = tl.load(seg_ad + s)
        if (a >= 0) & (lo < row0 + BLOCK_M) & (hi > row0) & (hi > lo):
            in_seg = (rows >= lo) & (rows < hi) & (rows < T)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + kk
                xt = tl.load(inp + rows64[:, None] * s_it + ks[None, :] * s_ik,
                             mask=in_seg[:, None] & (ks[None, :] < K), other=0.0)
                mt = tl.load(mat + a.to(tl.int64) * s_ma + ks[:, None] * s_mk + rr[None, :] * s_mr,
                             mask=(ks[:, None] < K) & (rr[None, :] < R), other=0.0)
                acc = _dot(xt, mt, acc, DOT_F32, PREC)
            res += acc       # rows outside the segment were loaded as 0
    tl.store(z + rows64[:, None] * s_zt + rr[None, :] * s_zr, res, mask=(rows[:, None] < T) & (rr[None, :] < R))


@triton.jit
def _gemm_lora_kernel(inp, w, bias, z, up, out, seg_off, seg_ad, T, N, K, R, S, scale,
                      s_it, s_ik,           # inp (T, K)
                      s_wk, s_wn,           # Wop[k, n] at w + k * s_wk + n * s_wn
                      s_zt, s_zr,           # z (T, R) fp32
                      s_ua, s_ur, s_un,     # Up_a[r, n] at up + a * s_ua + r * s_ur + n * s_un
                      s_ot, s_on,           # out (T, N)
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_F32: tl.constexpr, PREC: tl.constexpr, EPI_PREC: tl.constexpr):
    # Grouped launch order: GROUP_M consecutive row blocks walk the same Wop column tiles (L2 reuse).
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < T
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        xt = tl.load(inp + rows64[:, None] * s_it + ks[None, :] * s_ik,
                     mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        wt = tl.load(w + ks[:, None] * s_wk + cols[None, :] * s_wn,
                     mask=(ks[:, None] < K) & col_ok[None, :], other=0.0)
        acc = _dot(xt, wt, acc, DOT_F32, PREC)

    # LoRA epilogue: for each segment overlapping this row block, + Z_seg @ Up_a (fp32 operands).
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(S):
        lo = tl.load(seg_off + s)
        hi = tl.load(seg_off + s + 1)
        a = tl.load(seg_ad + s)
        if (a >= 0) & (lo < row0 + BLOCK_M) & (hi > row0) & (hi > lo):
            in_seg = (rows >= lo) & (rows < hi) & row_ok
            zt = tl.load(z + rows64[:, None] * s_zt + rr[None, :] * s_zr,
                         mask=in_seg[:, None] & (rr[None, :] < R), other=0.0)
            ut = tl.load(up + a.to(tl.int64) * s_ua + rr[:, None] * s_ur + cols[None, :] * s_un,
                         mask=(rr[:, None] < R) & col_ok[None, :], other=0.0)
            lora = tl.dot(zt, ut.to(tl.float32), lora, input_precision=EPI_PREC)
    acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows64[:, None] * s_ot + cols[None, :] * s_on, acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def _stack(t: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(n_adapters, ...) in the I/O dtype: a stacked tensor as is, or a stack of the per-adapter tensors
    (a copy of n * r * (in + out) elements, ~1 % of what the GEMM reads at r = 64)."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype)
    return torch.stack([a.to(dtype) for a in t]) if len(t) > 1 else t[0].to(dtype).unsqueeze(0)


def _precisions(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(fp32 operands in tl.dot, main-loop precision, epilogue precision)."""
    if interpreting():
        return True, "ieee", "ieee"
    if dtype == torch.float32:   # fp32 I/O follows torch's matmul setting (F.linear is IEEE by default)
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return False, prec, prec
    # bf16/fp16 operands on the tensor cores; the small fp32 rank-R epilogue on TF32 (10-bit mantissa > bf16's 7).
    return False, "tf32", "tf32"


def _gemm_config(T: int, N: int, K: int, dtype: torch.dtype) -> dict:
    if interpreting():   # every program instance and loop trip costs ~ms: few, large blocks
        return dict(BLOCK_M=block_for(max(T, 16), 128), BLOCK_N=block_for(max(N, 16), 128),
                    BLOCK_K=block_for(max(K, 16), 128), GROUP_M=1, num_warps=4, num_stages=1)
    # Hopper/Ampere: 128x128 tiles, 3-4 stage pipeline (not autotuned: tuned by hand for the Z-Image sizes).
    bm = 128 if T > 64 else max(16, triton.next_power_of_2(T))
    bk = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)


def _down_config(T: int, K: int, R: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=block_for(max(T, 16), 128), BLOCK_K=block_for(max(K, 16), 128), num_warps=4, num_stages=1)
    # Memory-bound skinny GEMM (T x K x R): small row blocks for enough CTAs to stream inp.
    return dict(BLOCK_M=32 if T > 2048 else 16, BLOCK_K=128 if R <= 64 else 64, num_warps=4, num_stages=4)


def _check_segments(T: int, seg_offsets: torch.Tensor, seg_adapter: torch.Tensor, device) -> int:
    S = seg_adapter.numel()
    assert seg_offsets.dtype == torch.int32 and seg_adapter.dtype == torch.int32, "segment tensors are int32"
    assert seg_offsets.shape == (S + 1,) and seg_adapter.shape == (S,), "seg_offsets (S+1,), seg_adapter (S,)"
    assert seg_offsets.device == device and seg_adapter.device == device, "segment tensors live on x's device"
    return S


def _down(inp, mat, s_mat, R, seg_offsets, seg_adapter, z=None):
    """Z (T, R) fp32: Z[t] = inp[t] @ M_a for the adapter a of t's segment, 0 on rows without adapter.
    ``s_mat`` = (stride per adapter, stride along inp's K, stride along R) of ``mat``."""
    T, K = inp.shape
    S = _check_segments(T, seg_offsets, seg_adapter, inp.device)
    if z is None:
        z = torch.empty(T, R, device=inp.device, dtype=torch.float32)
    assert z.shape == (T, R) and z.dtype == torch.float32
    if T == 0:
        return z
    dot_f32, prec, _ = _precisions(inp.dtype)
    cfg = _down_config(T, K, R)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]),)
    _down_kernel[grid](inp, mat, z, seg_offsets, seg_adapter, T, K, R, S,
                       inp.stride(0), inp.stride(1), *s_mat, z.stride(0), z.stride(1),
                       BLOCK_R=max(16, triton.next_power_of_2(R)), DOT_F32=dot_f32, PREC=prec, **cfg)
    return z


def _gemm_lora(inp, w, s_w, N, bias, z, up, s_up, scale, seg_offsets, seg_adapter, out=None):
    """out (T, N) = inp @ Wop + bias + scale * Z_seg @ Up_a; ``s_w`` = Wop's (k, n) strides, ``s_up`` = Up's
    (adapter, r, n) strides."""
    T, K = inp.shape
    R = z.shape[1]
    S = _check_segments(T, seg_offsets, seg_adapter, inp.device)
    if out is None:
        out = torch.empty(T, N, device=inp.device, dtype=inp.dtype)
    assert out.shape == (T, N) and out.dtype == inp.dtype
    if T == 0:
        return out
    dot_f32, prec, epi_prec = _precisions(inp.dtype)
    cfg = _gemm_config(T, N, K, inp.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gemm_lora_kernel[grid](inp, w, bias if bias is not None else inp, z, up, out, seg_offsets, seg_adapter,
                            T, N, K, R, S, float(scale), inp.stride(0), inp.stride(1), *s_w,
                            z.stride(0), z.stride(1), *s_up, out.stride(0), out.stride(1),
                            HAS_BIAS=bias is not None, BLOCK_R=max(16, triton.next_power_of_2(R)),
                            DOT_F32=dot_f32, PREC=prec, EPI_PREC=epi_prec, **cfg)
    return out


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale: float, seg_offsets, seg_adapter, out=None, u=None):
    """Y = X W^T + b + scale * (X_s A_a^T) B_a^T per segment; returns (Y (T, out) x.dtype, U (T, r) fp32).

    x (T, in); weight (out, in) in x.dtype; bias (out,) or None; lora_A (n, r, in) / lora_B (n, out, r)
    stacked tensors or sequences of n (r, in) / (out, r) tensors (any float dtype: cast to x.dtype);
    seg_offsets int32 (S+1,) spanning [0, T]; seg_adapter int32 (S,) in [-1, n). U = X A_a^T per row
    (0 on rows without adapter) is what the backward needs for dB.
    """
    assert x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.dtype == x.dtype
    A, B = _stack(lora_A, x.dtype), _stack(lora_B, x.dtype)
    n, R, K = A.shape
    N = weight.shape[0]
    assert B.shape == (n, N, R), f"lora_B {tuple(B.shape)} != {(n, N, R)}"
    u = _down(x, A, (A.stride(0), A.stride(2), A.stride(1)), R, seg_offsets, seg_adapter, z=u)
    y = _gemm_lora(x, weight, (weight.stride(1), weight.stride(0)), N, bias, u,
                   B, (B.stride(0), B.stride(2), B.stride(1)), scale, seg_offsets, seg_adapter, out=out)
    return y, u


def row_adapter(seg_offsets: torch.Tensor, seg_adapter: torch.Tensor, T: int) -> torch.Tensor:
    """int64 (T,): the adapter index of every row (-1: none), computed on the device (no host sync)."""
    rows = torch.arange(T, device=seg_offsets.device, dtype=torch.int32)
    seg = torch.searchsorted(seg_offsets[1:].contiguous(), rows, right=True).clamp_(max=max(seg_adapter.numel() - 1, 0))
    return seg_adapter.long()[seg] if seg_adapter.numel() else torch.full((T,), -1, device=rows.device)


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, u, scale: float, seg_offsets, seg_adapter,
                    need_dx: bool = True, grad_adapters: Sequence[int] = (), need_dw: bool = False,
                    need_db: bool = False, dx=None):
    """Gradients of lora_linear_fwd: returns (dX | None, [dA_a], [dB_a] for a in grad_adapters, dW | None, db | None).

    dX = dY W + scale * (dY B_a) A_a per segment: Triton (V = dY B_a launch + GEMM with the LoRA epilogue).
    dB_a = scale * dY^T U|rows of a, dA_a = scale * (V|rows of a)^T X, dW = dY^T X, db = sum dY: torch matmuls
    (rank-r and optional base grads; masks instead of slicing keep it free of host syncs). ``x`` is only read
    for dA/dW and ``u`` only for dB (either may be None otherwise). dA_a/dB_a come in lora_A[a]/lora_B[a]'s dtype.
    """
    A_list = list(lora_A) if not isinstance(lora_A, torch.Tensor) else list(lora_A.unbind(0))
    B_list = list(lora_B) if not isinstance(lora_B, torch.Tensor) else list(lora_B.unbind(0))
    dtype = dy.dtype
    A, B = _stack(A_list, dtype), _stack(B_list, dtype)
    n, R, K = A.shape
    T, N = dy.shape
    assert weight.shape == (N, K) and weight.dtype == dtype
    v = _down(dy, B, (B.stride(0), B.stride(1), B.stride(2)), R, seg_offsets, seg_adapter)   # V = dY B_a (T, r) fp32
    gx = None
    if need_dx:
        gx = _gemm_lora(dy, weight, (weight.stride(0), weight.stride(1)), K, None, v,
                        A, (A.stride(0), A.stride(1), A.stride(2)), scale, seg_offsets, seg_adapter, out=dx)
    dA, dB = [], []
    if grad_adapters:
        ad = row_adapter(seg_offsets, seg_adapter, T)[:, None]
        for a in grad_adapters:
            mine = ad == a
            dB.append((scale * (dy.t() @ torch.where(mine, u, 0.0).to(dtype))).to(B_list[a].dtype))
            dA.append((scale * (torch.where(mine, v, 0.0).to(dtype).t() @ x)).to(A_list[a].dtype))
    gw = dy.t() @ x if need_dw else None
    gb = dy.sum(0, dtype=torch.float32).to(dtype) if need_db else None
    return gx, dA, dB, gw, gb
