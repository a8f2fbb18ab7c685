"""Varlen (packed) bidirectional attention, FlashAttention-2 style: forward gives O and LSE; backward takes dO, dLSE.

Layout (flash-attn "THD"): q (Tq, H, D), k/v (Tk, H, D), last dim contiguous; int32 cu_seqlens_q / cu_seqlens_k (S+1,):
query segment s (rows cu_q[s]:cu_q[s+1]) attends to KV segment s (rows cu_k[s]:cu_k[s+1]), no mask inside, nothing
across. LSE = logsumexp_j(scale * q.k_j) in natural-log units, fp32 (H, Tq) (flash-attn varlen's softmax_lse layout).
A query whose KV segment is empty gets O = 0 and LSE = -inf (the neutral element of merge_state).

Forward: one program per (BLOCK_M query rows, segment, head), online softmax in fp32 (exp2 with log2(e) folded in).
Backward: preprocess delta = rowsum(dO * O) - dLSE (fp32 (H, Tq)); then one program per (BLOCK_N keys, segment, head)
accumulates dK, dV over the segment's query blocks; then a separate pass, one program per (BLOCK_M queries, segment,
head), accumulates dQ over the KV blocks. No atomics: the backward is deterministic.

tl.dot operands: fp16/bf16 I/O on a GPU feed the tensor cores directly (P and dS rounded to the I/O dtype, fp32
accumulation, as FlashAttention-2); fp32 I/O and the interpreter run every dot in fp32 with IEEE precision, P and dS
unrounded (the interpreter's bf16 tl.dot returns garbage, see shared/reference/environment.md section 2). So under
the interpreter bf16/fp16 results carry only the input and output roundings; on a GPU, P's rounding adds ~1 ulp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


# Nested @triton.jit calls are expensive under the interpreter (each call re-patches triton.language), so the kernels
# below inline their helpers: UPCAST converts every loaded dot operand to fp32 right after the load (then P / dS stay
# fp32 too, since they are cast to the operand dtype), DOT_PREC is "ieee" with UPCAST, else the default.
# TRANS_BY_LOAD (interpreter): transposed operands are loaded transposed instead of tl.trans'ed, because the
# interpreter's dot (np.matmul with dtype=) falls off BLAS on transposed views (~100x slower).


@triton.jit
def _rtne_bf16(x):
    # fp32 -> bf16, round to nearest even on the bits (the interpreter's own cast truncates). Once per program.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, qk_scale,  # qk_scale = softmax_scale * log2(e)
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_lh, s_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    pid_m, seg, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(CU_Q + seg)
    len_q = tl.load(CU_Q + seg + 1) - q0
    if pid_m * BLOCK_M >= len_q:
        return
    k0 = tl.load(CU_K + seg)
    len_k = tl.load(CU_K + seg + 1) - k0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < len_q, offs_d < HEAD_DIM
    rows_q = (q0 + offs_m).to(tl.int64)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows_q[:, None] * s_qt + head * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # loop-invariant pointers of the segment's first key block: K^T tile (D, N), V tile (N, D)
    kt_ptrs = K + (k0 + offs_n).to(tl.int64)[None, :] * s_kt + head * s_kh + offs_d[:, None]
    v_ptrs = V + (k0 + offs_n).to(tl.int64)[:, None] * s_vt + head * s_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        n_ok = (start_n + offs_n) < len_k
        kt = tl.load(kt_ptrs + start_n * s_kt, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * s_vt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_k = l_i > 0.0  # False only for an empty KV segment: O = 0, LSE = -inf
    l_safe = tl.where(has_k, l_i, 1.0)
    out = acc / l_safe[:, None]
    if RTNE_BF16:
        out = _rtne_bf16(out)
    tl.store(O + rows_q[:, None] * s_ot + head * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_k, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + head * s_lh + rows_q * s_lt, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, T,
    s_ot, s_oh, s_dot, s_doh, s_glh, s_glt, s_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # delta[h, t] = sum_d dO * O - dLSE  (fp32 (H, T))
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = rows < T
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * s_ot + head * s_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows64[:, None] * s_dot + head * s_doh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + head * s_glh + rows64 * s_glt, mask=t_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + head * s_dh + rows64, delta, mask=t_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, qk_scale, sm_scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lh, s_lt, s_dh,
    s_dkt, s_dkh, s_dvt, s_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RTNE_BF16: tl.constexpr, TRANS_BY_LOAD: tl.constexpr,
):
    pid_n, seg, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k0 = tl.load(CU_K + seg)
    len_k = tl.load(CU_K + seg + 1) - k0
    if pid_n * BLOCK_N >= len_k:
        return
    q0 = tl.load(CU_Q + seg)
    len_q = tl.load(CU_Q + seg + 1) - q0

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < len_k, offs_d < HEAD_DIM
    rows_k = (k0 + offs_n).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + rows_k[:, None] * s_kt + head * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_k[:, None] * s_vt + head * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    rows_q = (q0 + offs_m).to(tl.int64)
    q_ptrs = Q + rows_q[:, None] * s_qt + head * s_qh + offs_d[None, :]
    do_ptrs = DO + rows_q[:, None] * s_dot + head * s_doh + offs_d[None, :]
    qt_ptrs = Q + rows_q[None, :] * s_qt + head * s_qh + offs_d[:, None]  # (D, M) tiles, TRANS_BY_LOAD only
    dot_ptrs = DO + rows_q[None, :] * s_dot + head * s_doh + offs_d[:, None]
    lse_ptrs = LSE + head * s_lh + rows_q * s_lt
    delta_ptrs = DELTA + head * s_dh + rows_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, len_q, BLOCK_M):
        m_ok = (start_m + offs_m) < len_q
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs + start_m * s_qt, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs + start_m * s_dot, mask=q_mask, other=0.0)
        if TRANS_BY_LOAD:
            qt_mask = m_ok[None, :] & d_ok[:, None]
            qt = tl.load(qt_ptrs + start_m * s_qt, mask=qt_mask, other=0.0)
            dot = tl.load(dot_ptrs + start_m * s_dot, mask=qt_mask, other=0.0)
        else:
            qt = tl.trans(q)
            dot = tl.trans(do)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            qt = qt.to(tl.float32)
            dot = dot.to(tl.float32)
        lse = tl.load(lse_ptrs + start_m * s_lt, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptrs + start_m, mask=m_ok, other=0.0)
        # transposed tiles (keys x queries): P^T = exp2(K Q^T * scale * log2e - lse * log2e)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
        pt = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, dot, input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dk *= sm_scale
    if RTNE_BF16:
        dk = _rtne_bf16(dk)
        dv = _rtne_bf16(dv)
    tl.store(DK + rows_k[:, None] * s_dkt + head * s_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows_k[:, None] * s_dvt + head * s_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, qk_scale, sm_scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_lh, s_lt, s_dh, s_dqt, s_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RTNE_BF16: tl.constexpr, TRANS_BY_LOAD: tl.constexpr,
):
    pid_m, seg, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(CU_Q + seg)
    len_q = tl.load(CU_Q + seg + 1) - q0
    if pid_m * BLOCK_M >= len_q:
        return
    k0 = tl.load(CU_K + seg)
    len_k = tl.load(CU_K + seg + 1) - k0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < len_q, offs_d < HEAD_DIM
    rows_q = (q0 + offs_m).to(tl.int64)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows_q[:, None] * s_qt + head * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * s_dot + head * s_doh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + head * s_lh + rows_q * s_lt, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * s_dh + rows_q, mask=m_ok, other=0.0)
    rows_k = (k0 + offs_n).to(tl.int64)
    kt_ptrs = K + rows_k[None, :] * s_kt + head * s_kh + offs_d[:, None]  # (D, N) tiles
    vt_ptrs = V + rows_k[None, :] * s_vt + head * s_vh + offs_d[:, None]
    k_ptrs = K + rows_k[:, None] * s_kt + head * s_kh + offs_d[None, :]  # (N, D), TRANS_BY_LOAD only
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        n_ok = (start_n + offs_n) < len_k
        t_mask = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(kt_ptrs + start_n * s_kt, mask=t_mask, other=0.0)
        vt = tl.load(vt_ptrs + start_n * s_vt, mask=t_mask, other=0.0)
        if TRANS_BY_LOAD:
            k = tl.load(k_ptrs + start_n * s_kt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.trans(kt)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
            k = k.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq *= sm_scale
    if RTNE_BF16:
        dq = _rtne_bf16(dq)
    tl.store(DQ + rows_q[:, None] * s_dqt + head * s_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------------------
# launchers


def _needs_rtne(dtype: torch.dtype) -> bool:
    """Round fp32 -> bf16 stores by hand (the interpreter would truncate)."""
    return interpreting() and dtype == torch.bfloat16


def _dot_flags(dtype: torch.dtype) -> dict:
    """fp32 I/O and the interpreter: fp32 operands, IEEE dots. fp16/bf16 on a GPU: tensor-core dots in that dtype."""
    upcast = interpreting() or dtype == torch.float32
    return dict(UPCAST=upcast, DOT_PREC="ieee" if upcast else "tf32")


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _launch_params(max_q: int, max_k: int, head_dim: int, dtype: torch.dtype, which: str,
                   block_m: int | None = None, block_n: int | None = None) -> dict:
    """BLOCK_M (query rows per tile), BLOCK_N (key rows per tile), warps, stages; block_m / block_n override.

    Interpreter: few, large programs (up to 128 rows: the cost is per program instance and per op, not per element).
    GPU (not tuned on hardware yet): fwd 128x64, bwd 64x64; halved for fp32 I/O (shared memory).
    """
    if interpreting():
        bm, bn, warps, stages = _pow2_clamp(max_q, 16, 128), _pow2_clamp(max_k, 16, 128), 4, 1
    else:
        big = head_dim > 64
        bm, bn = (128, 64) if which == "fwd" else (64, 64)
        if dtype == torch.float32:
            bm, bn = bm // 2, bn // 2
        warps, stages = 8 if big else 4, 2 if which == "fwd" else 1
    for b in (block_m, block_n):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot); got {b}")
    return dict(BLOCK_M=block_m or bm, BLOCK_N=block_n or bn, num_warps=warps, num_stages=stages)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (Tq, H, D) and k, v (Tk, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.shape != cu_k.shape or cu_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be int32 (S+1,) tensors of the same length")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def packed_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float | None = None, *, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O (Tq, H, D) in q's dtype and LSE fp32 (H, Tq). `out` / `lse` are optional preallocated outputs;
    block_m / block_n override the tile sizes (tests use small ones to exercise multi-block loops)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    tq, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(heads, tq, device=q.device, dtype=torch.float32) if lse is None else lse
    assert out.shape == q.shape and out.stride(-1) == 1 and lse.shape == (heads, tq) and lse.dtype == torch.float32
    num_seg = cu_seqlens_q.numel() - 1
    if tq == 0 or num_seg == 0 or heads == 0:
        return out, lse
    cfg = _launch_params(max_seqlen_q, max_seqlen_k, head_dim, q.dtype, "fwd", block_m, block_n)
    grid = (triton.cdiv(max(max_seqlen_q, 1), cfg["BLOCK_M"]), num_seg, heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=_pow2_clamp(head_dim, 16, 1 << 30), **_dot_flags(q.dtype),
        RTNE_BF16=_needs_rtne(out.dtype), **cfg,
    )
    return out, lse


def packed_attention_bwd(
    dout: torch.Tensor, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float | None = None, *,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (shapes/dtypes of q, k, v) from dO (Tq, H, D) and dLSE fp32 (H, Tq) or None (= zeros)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v, out, dout = (_rowmajor(t) for t in (q, k, v, out, dout))
    tq, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.stride(-1) == 1 and dk.stride(-1) == 1 and dv.stride(-1) == 1
    num_seg = cu_seqlens_q.numel() - 1
    block_d = _pow2_clamp(head_dim, 16, 1 << 30)

    delta = torch.empty(heads, tq, device=q.device, dtype=torch.float32)
    if tq and heads:
        block_t = _pow2_clamp(tq, 1, max(1, (16384 if interpreting() else 4096) // block_d))
        g = dlse if dlse is not None else lse  # dummy pointer when HAS_DLSE is False
        _bwd_preprocess_kernel[(triton.cdiv(tq, block_t), heads)](
            out, dout, g, delta, tq,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), g.stride(0), g.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, HAS_DLSE=dlse is not None,
        )
    if num_seg == 0 or heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = _launch_params(max_seqlen_q, max_seqlen_k, head_dim, q.dtype, "bwd", block_m, block_n)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, RTNE_BF16=_needs_rtne(q.dtype), **_dot_flags(q.dtype),
                  TRANS_BY_LOAD=interpreting(), **cfg)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1), delta.stride(0))
    if k.shape[0]:
        _bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen_k, 1), cfg["BLOCK_N"]), num_seg, heads)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, scale * LOG2E, scale,
            *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), **common,
        )
    if tq:
        _bwd_dq_kernel[(triton.cdiv(max(max_seqlen_q, 1), cfg["BLOCK_M"]), num_seg, heads)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, scale * LOG2E, scale,
            *strides, dq.stride(0), dq.stride(1), **common,
        )
    return dq, dk, dv


def attention_flops(seqlens_q: list[int], seqlens_k: list[int], heads: int, head_dim: int, which: str) -> float:
    """Matmul FLOPs of the forward (2 GEMMs) / backward (5 GEMMs) over the given segment lengths."""
    pairs = sum(a * b for a, b in zip(seqlens_q, seqlens_k))
    gemms = {"fwd": 2, "bwd": 5, "full": 7}[which]
    return 2.0 * gemms * pairs * heads * head_dim


__all__ = ["packed_attention_fwd", "packed_attention_bwd", "attention_flops", "MAX_HEAD_DIM"]
