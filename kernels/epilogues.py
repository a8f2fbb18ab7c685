"""Block epilogues of Z-Image / FLUX.2 (tier 1a): Triton kernels + launchers, tensors in and out, no autograd.

  modulated_rms_norm    out = RMSNorm(x) * w * (1 + scale[sample])            Z-Image attention_norm1/ffn_norm1 prologue
  gated_residual        out = x + tanh(gate[sample]) * RMSNorm(a) * w         Z-Image x + gate * attention_norm2(a)
  qk_norm_rope          out = rope(RMSNorm_head(q) * w_q), same for k          per-head qk-norm + adjacent-pair RoPE
  modulated_layer_norm  out = LayerNorm(x) * (1 + scale[sample]) + shift      FLUX.2 modulation, Z-Image final layer

Layout: packed tokens, one row per token, (T, D) with unit stride along D (q/k: (T, H, head_dim), any token and
head strides). Per-sample modulation is (B, D), indexed per token by int64 ``sample_index`` (T,); B == 1 broadcasts
and ignores ``sample_index``. Maths is fp32 whatever the I/O dtype (statistics, modulation, RoPE), rounded once on
store; the reference in dopsd_fast/ops/reference.py rounds where the model rounds, so bf16 I/O differs by ~1 ulp.

Forward: a tile of BLOCK_T rows x BLOCK_D columns per program (one row per program on a GPU at D = 3072/3840; many
rows under the interpreter, where each program instance is slow). A row is never split: D <= MAX_D.
Backward: rstd is recomputed from x (the row is loaded anyway), not saved. dx is written in one pass; dweight and
the per-sample dscale/dgate/dshift are accumulated in fp32 registers per program and written to per-program partial
buffers (P, D) / (P, B, D), then reduced with a torch ``.sum(0)``: deterministic (no atomics), P ~ 2 x SM count.
Per-sample sums keep one register accumulator for the current sample and flush it (read-add-write into this
program's own partial row) when the sample id changes, so sorted ``sample_index`` (packed samples) costs one flush
per sample boundary; any order is still correct.
qk_norm_rope: tile rows are (token, head) pairs, columns (pair i, re/im) split with tl.split / tl.join (adjacent
pairs, no strided loads); one token (all heads of q, then of k) per program on a GPU. tanh (gated_residual) is
written out: there is no tl.tanh, and libdevice.tanh does not run under the interpreter.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dopsd_fast.ops.reference import rms_norm_dtype

from ._config import block_for, interpreting, num_warps_for

MAX_D = 8192  # one register tile per row; Z-Image D = 3840, FLUX.2 klein 3072 / 4096
_BIG = tl.constexpr(2**62)  # larger than any sample id (masked rows in a min); constexpr: jit may read it


# ---------------------------------------------------------------------------------------------- launch helpers
def _rows_per_tile(block_cols: int, n_rows: int, block_t: int | None = None) -> int:
    # Elements per tile: 4096 on a GPU (one D = 3840 row; more rows when D is small); 16K when interpreting.
    # block_t (a power of two) overrides it: tests use small tiles to cross tile and program boundaries.
    if block_t is not None:
        return block_t
    budget = 16384 if interpreting() else 4096
    return max(1, min(triton.next_power_of_2(max(n_rows, 1)), budget // block_cols))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_rows(n_rows: int, block_t: int, device: torch.device, num_programs: int | None) -> tuple[int, int]:
    """(programs P, rows per program R, a multiple of block_t) for the backward's persistent row loop."""
    tiles = triton.cdiv(n_rows, block_t)
    if tiles == 0:
        return 1, block_t
    if num_programs is None:
        num_programs = 2 if interpreting() or device.type != "cuda" else 2 * _sm_count(device.index or 0)
    rows = triton.cdiv(tiles, max(1, min(tiles, num_programs))) * block_t
    return triton.cdiv(n_rows, rows), rows


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: torch.Tensor, name: str = "x") -> int:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (tokens, D), got {tuple(x.shape)}")
    if x.shape[1] > MAX_D:
        raise ValueError(f"{name}: D={x.shape[1]} > MAX_D={MAX_D} (one register tile per row)")
    return x.shape[1]


def _modulation(v: torch.Tensor, sample_index: torch.Tensor | None, n_rows: int, d: int, name: str):
    """(B, D) per-sample values -> (tensor with unit column stride, per_sample flag, index tensor or v as dummy)."""
    if v.dim() != 2 or v.shape[1] != d:
        raise ValueError(f"{name} must be (B, {d}), got {tuple(v.shape)}")
    v = _rows2d(v)
    if v.shape[0] == 1:
        return v, False, v  # broadcast row; the index pointer is never read
    if sample_index is None or sample_index.shape != (n_rows,) or sample_index.dtype != torch.int64:
        raise ValueError(f"{name} has B={v.shape[0]} rows: sample_index must be int64 ({n_rows},)")
    return v, True, sample_index.contiguous()


def _out(out: torch.Tensor | None, shape, dtype, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected {tuple(shape)} {dtype} with unit last stride, "
                         f"got {tuple(out.shape)} {out.dtype}")
    return out


# ------------------------------------------------------------------------------------------ shared jit helpers
@triton.jit
def _add_into(ptr, val, mask):
    # This program's own partial row: read-add-write, no other program touches it. The barrier orders the
    # write of an earlier flush before this read across warps (only on sample changes, so it is rare).
    tl.debug_barrier()
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _segment_accumulate(acc, cur, contrib, sid, valid, part_ptr, cols, col_mask, D):
    """Adds the rows of ``contrib`` [BT, BD] into per-sample sums. ``acc`` [BD] holds the running sum of sample
    ``cur``; ``part_ptr`` points at this program's (B, D) fp32 partial block. Returns (acc, cur)."""
    smin = tl.min(tl.where(valid, sid, _BIG), 0)
    smax = tl.max(tl.where(valid, sid, -1), 0)
    if (smin == cur) & (smax == cur):
        acc += tl.sum(contrib, 0)
    else:
        _add_into(part_ptr + cur * D + cols, acc, col_mask)
        for b in range(smin, smax):  # samples other than the last one of this tile (empty ids add zeros)
            _add_into(part_ptr + b * D + cols, tl.sum(tl.where((sid == b)[:, None], contrib, 0.0), 0), col_mask)
        acc = tl.sum(tl.where((sid == smax)[:, None], contrib, 0.0), 0)
        cur = smax
    return acc, cur


@triton.jit
def _rows_of(r0, T, BLOCK_T: tl.constexpr):
    rows = r0 + tl.arange(0, BLOCK_T)
    return rows.to(tl.int64), rows < T


@triton.jit
def _tanh(g):
    # No tl.tanh (libdevice.tanh does not run under the interpreter). Odd Taylor series to g^7 for |g| < 1/8
    # (truncation < 2e-9 relative), (1 - e) / (1 + e) with e = exp(-2|g|) elsewhere: ~1 ulp in fp32.
    a = tl.abs(g)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    g2 = g * g
    small = g * (1.0 + g2 * (-1.0 / 3.0 + g2 * (2.0 / 15.0 + g2 * (-17.0 / 315.0))))
    return tl.where(a < 0.125, small, tl.where(g < 0, -big, big))


@triton.jit
def _sample_rows(IDX, rows, row_mask, PER_SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr):
    if PER_SAMPLE:
        sid = tl.load(IDX + rows, mask=row_mask, other=0)
    else:
        sid = tl.zeros([BLOCK_T], tl.int64)
    return sid


# ------------------------------------------------------------------------------------------ modulated RMSNorm
@triton.jit
def _mrn_fwd(X, W, S, IDX, OUT, T, D, sx, ss, so, eps,
             PER_SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rm = _rows_of(tl.program_id(0) * BLOCK_T, T, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    m = rm[:, None] & cm[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
    s = tl.load(S + sid[:, None] * ss + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :] * (1.0 + s)
    tl.store(OUT + rows[:, None] * so + cols[None, :], y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _mrn_bwd(DY, X, W, S, IDX, DX, DW, DS, T, D, sdy, sx, ss, sdx, B, eps, rows_per_prog,
             PER_SAMPLE: tl.constexpr, HAS_DW: tl.constexpr, HAS_DS: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    ds_acc = tl.zeros([BLOCK_D], tl.float32)
    if PER_SAMPLE:
        cur = tl.load(IDX + start)  # sample whose sums the register accumulator holds
    else:
        cur = 0
    for r0 in range(start, end, BLOCK_T):
        rows, rm = _rows_of(r0, end, BLOCK_T)
        m = rm[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
        mod = 1.0 + tl.load(S + sid[:, None] * ss + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
        xhat = x * rstd[:, None]
        g = dy * w[None, :] * mod  # dL/dxhat
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / D)[:, None])
        tl.store(DX + rows[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        if HAS_DW:
            dw_acc += tl.sum(dy * mod * xhat, 0)
        if HAS_DS:
            c = dy * xhat * w[None, :]
            if PER_SAMPLE:
                ds_acc, cur = _segment_accumulate(ds_acc, cur, c, sid, rm, DS + pid * B * D, cols, cm, D)
            else:
                ds_acc += tl.sum(c, 0)
    if HAS_DW:
        tl.store(DW + pid * D + cols, dw_acc, mask=cm)
    if HAS_DS:
        if PER_SAMPLE:
            _add_into(DS + pid * B * D + cur * D + cols, ds_acc, cm)
        else:
            tl.store(DS + pid * D + cols, ds_acc, mask=cm)


def modulated_rms_norm_fwd(x, weight, scale, sample_index, eps: float, *, out=None, block_t: int | None = None):
    """x (T, D); weight (D,); scale (B, D); sample_index int64 (T,) or None when B == 1 -> out (T, D) in
    promote(rms_norm_dtype(weight), scale.dtype)."""
    d = _check(x)
    x = _rows2d(x)
    scale, per_sample, idx = _modulation(scale, sample_index, x.shape[0], d, "scale")
    out = _out(out, x.shape, torch.promote_types(rms_norm_dtype(weight.dtype), scale.dtype), x)
    T = x.shape[0]
    if T == 0:
        return out
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    _mrn_fwd[(triton.cdiv(T, bt),)](x, weight.contiguous(), scale, idx, out, T, d, x.stride(0), scale.stride(0),
                                   out.stride(0), eps, PER_SAMPLE=per_sample, BLOCK_T=bt, BLOCK_D=bd,
                                   num_warps=num_warps_for(bt * bd))
    return out


def modulated_rms_norm_bwd(grad, x, weight, scale, sample_index, eps: float, *, need_weight: bool = True,
                           need_scale: bool = True, dx=None, num_programs: int | None = None,
                           block_t: int | None = None):
    """grad (T, D) -> (dx (T, D) in x.dtype, dweight (D,) in weight.dtype or None, dscale (B, D) in
    scale.dtype or None)."""
    d = _check(x)
    x, grad = _rows2d(x), _rows2d(grad)
    T, B = x.shape[0], scale.shape[0]
    scale, per_sample, idx = _modulation(scale, sample_index, T, d, "scale")
    dx = _out(dx, x.shape, x.dtype, x)
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    P, R = _split_rows(T, bt, x.device, num_programs)
    dw = torch.zeros(P if need_weight else 1, d, dtype=torch.float32, device=x.device)
    ds = torch.zeros(P if need_scale else 1, B, d, dtype=torch.float32, device=x.device)
    if T > 0:
        _mrn_bwd[(P,)](grad, x, weight.contiguous(), scale, idx, dx, dw, ds, T, d, grad.stride(0), x.stride(0),
                       scale.stride(0), dx.stride(0), B, eps, R, PER_SAMPLE=per_sample, HAS_DW=need_weight,
                       HAS_DS=need_scale, BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    dweight = dw.sum(0).to(weight.dtype) if need_weight else None
    dscale = ds.sum(0).to(scale.dtype) if need_scale else None
    return dx, dweight, dscale


# ------------------------------------------------------------------------------------ gated RMSNorm residual
@triton.jit
def _gr_fwd(X, A, W, G, IDX, OUT, T, D, sx, sa, sg, so, eps,
            PER_SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rm = _rows_of(tl.program_id(0) * BLOCK_T, T, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    m = rm[:, None] & cm[None, :]
    a = tl.load(A + rows[:, None] * sa + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(a * a, 1) / D + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
    gate = tl.load(G + sid[:, None] * sg + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tg = _tanh(gate)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = x + tg * (a * rstd[:, None] * w[None, :])
    tl.store(OUT + rows[:, None] * so + cols[None, :], y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gr_bwd(DY, A, W, G, IDX, DA, DW, DG, T, D, sdy, sa, sg, sda, B, eps, rows_per_prog,
            PER_SAMPLE: tl.constexpr, HAS_DW: tl.constexpr, HAS_DG: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dgate partials hold sum(dy * RMSNorm(a) * w); the launcher applies (1 - tanh^2) per sample after the sum.
    pid = tl.program_id(0)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    dg_acc = tl.zeros([BLOCK_D], tl.float32)
    if PER_SAMPLE:
        cur = tl.load(IDX + start)  # sample whose sums the register accumulator holds
    else:
        cur = 0
    for r0 in range(start, end, BLOCK_T):
        rows, rm = _rows_of(r0, end, BLOCK_T)
        m = rm[:, None] & cm[None, :]
        a = tl.load(A + rows[:, None] * sa + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
        gate = tl.load(G + sid[:, None] * sg + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tg = _tanh(gate)
        rstd = tl.rsqrt(tl.sum(a * a, 1) / D + eps)
        ahat = a * rstd[:, None]
        g = dy * tg * w[None, :]
        da = rstd[:, None] * (g - ahat * (tl.sum(g * ahat, 1) / D)[:, None])
        tl.store(DA + rows[:, None] * sda + cols[None, :], da.to(DA.dtype.element_ty), mask=m)
        if HAS_DW:
            dw_acc += tl.sum(dy * tg * ahat, 0)
        if HAS_DG:
            c = dy * ahat * w[None, :]
            if PER_SAMPLE:
                dg_acc, cur = _segment_accumulate(dg_acc, cur, c, sid, rm, DG + pid * B * D, cols, cm, D)
            else:
                dg_acc += tl.sum(c, 0)
    if HAS_DW:
        tl.store(DW + pid * D + cols, dw_acc, mask=cm)
    if HAS_DG:
        if PER_SAMPLE:
            _add_into(DG + pid * B * D + cur * D + cols, dg_acc, cm)
        else:
            tl.store(DG + pid * D + cols, dg_acc, mask=cm)


def gated_residual_fwd(x, a, weight, gate, sample_index, eps: float, *, out=None, block_t: int | None = None):
    """x, a (T, D); weight (D,); gate (B, D) raw adaLN output (tanh applied here) -> out (T, D) in
    promote(x.dtype, gate.dtype, rms_norm_dtype(weight))."""
    d = _check(x)
    if a.shape != x.shape:
        raise ValueError(f"a {tuple(a.shape)} must match x {tuple(x.shape)}")
    x, a = _rows2d(x), _rows2d(a)
    gate, per_sample, idx = _modulation(gate, sample_index, x.shape[0], d, "gate")
    dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, rms_norm_dtype(weight.dtype)))
    out = _out(out, x.shape, dtype, x)
    T = x.shape[0]
    if T == 0:
        return out
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    _gr_fwd[(triton.cdiv(T, bt),)](x, a, weight.contiguous(), gate, idx, out, T, d, x.stride(0), a.stride(0),
                                  gate.stride(0), out.stride(0), eps, PER_SAMPLE=per_sample, BLOCK_T=bt,
                                  BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return out


def gated_residual_bwd(grad, a, weight, gate, sample_index, eps: float, *, need_weight: bool = True,
                       need_gate: bool = True, da=None, num_programs: int | None = None,
                       block_t: int | None = None):
    """grad (T, D) -> (da in a.dtype, dweight (D,) or None, dgate (B, D) or None). dx = grad (identity) is the
    caller's."""
    d = _check(a, "a")
    a, grad = _rows2d(a), _rows2d(grad)
    T, B = a.shape[0], gate.shape[0]
    gate, per_sample, idx = _modulation(gate, sample_index, T, d, "gate")
    da = _out(da, a.shape, a.dtype, a)
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    P, R = _split_rows(T, bt, a.device, num_programs)
    dw = torch.zeros(P if need_weight else 1, d, dtype=torch.float32, device=a.device)
    dg = torch.zeros(P if need_gate else 1, B, d, dtype=torch.float32, device=a.device)
    if T > 0:
        _gr_bwd[(P,)](grad, a, weight.contiguous(), gate, idx, da, dw, dg, T, d, grad.stride(0), a.stride(0),
                      gate.stride(0), da.stride(0), B, eps, R, PER_SAMPLE=per_sample, HAS_DW=need_weight,
                      HAS_DG=need_gate, BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    dweight = dw.sum(0).to(weight.dtype) if need_weight else None
    dgate = None
    if need_gate:
        dgate = (dg.sum(0) * (1.0 - torch.tanh(gate.float()) ** 2)).to(gate.dtype)  # d tanh = 1 - tanh^2
    return da, dweight, dgate


# ------------------------------------------------------------------------------------- qk RMSNorm + RoPE
@triton.jit
def _head_tile(t0, T, H, st, sh, HALF, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Rows of the tile = (token, head) pairs; columns = (pair i, component j), j = 0 real, 1 imaginary.
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    t = t0 + r // BLOCK_H
    h = r % BLOCK_H
    rv = (t < T) & (h < H)
    i = tl.arange(0, BLOCK_HALF)
    j = tl.arange(0, 2)
    iv = i < HALF
    off = t.to(tl.int64)[:, None, None] * st + h[:, None, None] * sh + i[None, :, None] * 2 + j[None, None, :]
    return off, t, rv, i, iv, rv[:, None, None] & iv[None, :, None]


@triton.jit
def _norm_rope_fwd(X, W, O, COS, SIN, t0, T, H, sxt, sxh, sot, soh, sct, HALF, eps,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    off, t, rv, i, iv, m = _head_tile(t0, T, H, sxt, sxh, HALF, BLOCK_T, BLOCK_H, BLOCK_HALF)
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)  # [R, BLOCK_HALF, 2]
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, 2), 1) / (2 * HALF) + eps)
    j = tl.arange(0, 2)
    w = tl.load(W + i[:, None] * 2 + j[None, :], mask=iv[:, None], other=0.0).to(tl.float32)
    y = x * rstd[:, None, None] * w[None, :, :]
    re, im = tl.split(y)
    cm = rv[:, None] & iv[None, :]
    cs = t.to(tl.int64)[:, None] * sct + i[None, :]
    c = tl.load(COS + cs, mask=cm, other=0.0)
    s = tl.load(SIN + cs, mask=cm, other=0.0)
    o = tl.join(re * c - im * s, re * s + im * c)
    oo, _, _, _, _, _ = _head_tile(t0, T, H, sot, soh, HALF, BLOCK_T, BLOCK_H, BLOCK_HALF)
    tl.store(O + oo, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _norm_rope_bwd(DY, X, W, DX, COS, SIN, dw_acc, t0, T, H, sdyt, sdyh, sxt, sxh, sdxt, sdxh, sct, HALF, eps,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    off, t, rv, i, iv, m = _head_tile(t0, T, H, sxt, sxh, HALF, BLOCK_T, BLOCK_H, BLOCK_HALF)
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    offy, _, _, _, _, _ = _head_tile(t0, T, H, sdyt, sdyh, HALF, BLOCK_T, BLOCK_H, BLOCK_HALF)
    dre, dim_ = tl.split(tl.load(DY + offy, mask=m, other=0.0).to(tl.float32))
    cm = rv[:, None] & iv[None, :]
    cs = t.to(tl.int64)[:, None] * sct + i[None, :]
    c = tl.load(COS + cs, mask=cm, other=0.0)
    s = tl.load(SIN + cs, mask=cm, other=0.0)
    dy = tl.join(dre * c + dim_ * s, dim_ * c - dre * s)  # inverse rotation: dL/d(normed * w)
    j = tl.arange(0, 2)
    w = tl.load(W + i[:, None] * 2 + j[None, :], mask=iv[:, None], other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, 2), 1) / (2 * HALF) + eps)
    xhat = x * rstd[:, None, None]
    g = dy * w[None, :, :]
    dot = tl.sum(tl.sum(g * xhat, 2), 1) / (2 * HALF)
    dx = rstd[:, None, None] * (g - xhat * dot[:, None, None])
    offx, _, _, _, _, _ = _head_tile(t0, T, H, sdxt, sdxh, HALF, BLOCK_T, BLOCK_H, BLOCK_HALF)
    tl.store(DX + offx, dx.to(DX.dtype.element_ty), mask=m)
    return dw_acc + tl.sum(dy * xhat, 0)


@triton.jit
def _qk_fwd(Q, K, WQ, WK, OQ, OK, COS, SIN, T, HQ, HK, sqt, sqh, skt, skh, soqt, soqh, sokt, sokh, sct, HALF, eps,
            BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t0 = tl.program_id(0) * BLOCK_T
    _norm_rope_fwd(Q, WQ, OQ, COS, SIN, t0, T, HQ, sqt, sqh, soqt, soqh, sct, HALF, eps, BLOCK_T, BLOCK_HQ, BLOCK_HALF)
    _norm_rope_fwd(K, WK, OK, COS, SIN, t0, T, HK, skt, skh, sokt, sokh, sct, HALF, eps, BLOCK_T, BLOCK_HK, BLOCK_HALF)


@triton.jit
def _qk_bwd(DQ_OUT, DK_OUT, Q, K, WQ, WK, DQ, DK, DWQ, DWK, COS, SIN, T, HQ, HK,
            sgqt, sgqh, sgkt, sgkh, sqt, sqh, skt, skh, sdqt, sdqh, sdkt, sdkh, sct, HALF, eps, toks_per_prog,
            HAS_DW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * toks_per_prog
    end = tl.minimum(start + toks_per_prog, T)
    dwq = tl.zeros([BLOCK_HALF, 2], tl.float32)
    dwk = tl.zeros([BLOCK_HALF, 2], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        dwq = _norm_rope_bwd(DQ_OUT, Q, WQ, DQ, COS, SIN, dwq, t0, end, HQ, sgqt, sgqh, sqt, sqh, sdqt, sdqh, sct,
                             HALF, eps, BLOCK_T, BLOCK_HQ, BLOCK_HALF)
        dwk = _norm_rope_bwd(DK_OUT, K, WK, DK, COS, SIN, dwk, t0, end, HK, sgkt, sgkh, skt, skh, sdkt, sdkh, sct,
                             HALF, eps, BLOCK_T, BLOCK_HK, BLOCK_HALF)
    if HAS_DW:
        i = tl.arange(0, BLOCK_HALF)
        j = tl.arange(0, 2)
        off = pid * 2 * HALF + i[:, None] * 2 + j[None, :]
        tl.store(DWQ + off, dwq, mask=(i < HALF)[:, None])
        tl.store(DWK + off, dwk, mask=(i < HALF)[:, None])


def _qk_check(q, k, cos, sin):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: expected (T, H, head_dim), same T and even head_dim")
    half = q.shape[2] // 2
    fp32 = cos.dtype == torch.float32 and sin.dtype == torch.float32
    if cos.shape != (q.shape[0], half) or sin.shape != cos.shape or not fp32:
        raise ValueError(f"cos/sin must be fp32 ({q.shape[0]}, {half}), got {tuple(cos.shape)} {cos.dtype}")
    if half > MAX_D // 2:
        raise ValueError(f"head_dim {q.shape[2]} > MAX_D")
    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731  (token/head strides are free)
    return unit(q), unit(k), cos.contiguous(), sin.contiguous(), half


def _qk_blocks(T: int, hq: int, hk: int, half: int, block_t: int | None):
    bh = block_for(max(hq, hk), MAX_D) * triton.next_power_of_2(half) * 2  # elements of one token's widest tile
    bt = _rows_per_tile(bh, T, block_t)
    return bt, block_for(hq, MAX_D), block_for(hk, MAX_D), triton.next_power_of_2(half)


def qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps: float, *, out_q=None, out_k=None,
                     block_t: int | None = None):
    """q (T, Hq, hd), k (T, Hk, hd) with unit last stride; weights (hd,); cos/sin fp32 (T, hd/2) ->
    (out_q in rms_norm_dtype(q_weight), out_k in rms_norm_dtype(k_weight)), contiguous."""
    q, k, cos, sin, half = _qk_check(q, k, cos, sin)
    T, hq, hk = q.shape[0], q.shape[1], k.shape[1]
    out_q = _out(out_q, q.shape, rms_norm_dtype(q_weight.dtype), q)
    out_k = _out(out_k, k.shape, rms_norm_dtype(k_weight.dtype), k)
    if T == 0:
        return out_q, out_k
    bt, bhq, bhk, bhalf = _qk_blocks(T, hq, hk, half, block_t)
    _qk_fwd[(triton.cdiv(T, bt),)](q, k, q_weight.contiguous(), k_weight.contiguous(), out_q, out_k, cos, sin, T, hq,
                                  hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), out_q.stride(0),
                                  out_q.stride(1), out_k.stride(0), out_k.stride(1), cos.stride(0), half, eps,
                                  BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_HALF=bhalf,
                                  num_warps=num_warps_for(bt * max(bhq, bhk) * bhalf * 2))
    return out_q, out_k


def qk_norm_rope_bwd(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps: float, *, need_weight: bool = True,
                     dq=None, dk=None, num_programs: int | None = None, block_t: int | None = None):
    """-> (dq in q.dtype, dk in k.dtype, dq_weight, dk_weight (hd,) or None, None). cos/sin get no gradient."""
    q, k, cos, sin, half = _qk_check(q, k, cos, sin)
    grad_q, grad_k = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    T, hq, hk = q.shape[0], q.shape[1], k.shape[1]
    dq = _out(dq, q.shape, q.dtype, q)
    dk = _out(dk, k.shape, k.dtype, k)
    bt, bhq, bhk, bhalf = _qk_blocks(T, hq, hk, half, block_t)
    P, R = _split_rows(T, bt, q.device, num_programs)
    dwq = torch.zeros(P if need_weight else 1, 2 * half, dtype=torch.float32, device=q.device)
    dwk = torch.zeros_like(dwq)
    if T > 0:
        _qk_bwd[(P,)](grad_q, grad_k, q, k, q_weight.contiguous(), k_weight.contiguous(), dq, dk, dwq, dwk, cos, sin,
                      T, hq, hk, grad_q.stride(0), grad_q.stride(1), grad_k.stride(0), grad_k.stride(1),
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), dq.stride(0), dq.stride(1), dk.stride(0),
                      dk.stride(1), cos.stride(0), half, eps, R, HAS_DW=need_weight, BLOCK_T=bt, BLOCK_HQ=bhq,
                      BLOCK_HK=bhk, BLOCK_HALF=bhalf, num_warps=num_warps_for(bt * max(bhq, bhk) * bhalf * 2))
    if not need_weight:
        return dq, dk, None, None
    return dq, dk, dwq.sum(0).to(q_weight.dtype), dwk.sum(0).to(k_weight.dtype)


# ------------------------------------------------------------------------------------- modulated LayerNorm
@triton.jit
def _mln_fwd(X, SH, S, IDX, OUT, T, D, sx, ssh, ss, so, eps, HAS_SHIFT: tl.constexpr,
             PER_SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rm = _rows_of(tl.program_id(0) * BLOCK_T, T, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    m = rm[:, None] & cm[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)  # biased variance, like F.layer_norm
    sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
    s = tl.load(S + sid[:, None] * ss + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + s)
    if HAS_SHIFT:
        y += tl.load(SH + sid[:, None] * ssh + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * so + cols[None, :], y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _mln_bwd(DY, X, S, IDX, DX, DS, DSH, T, D, sdy, sx, ss, sdx, B, eps, rows_per_prog,
             PER_SAMPLE: tl.constexpr, HAS_DS: tl.constexpr, HAS_DSH: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, T)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    ds_acc = tl.zeros([BLOCK_D], tl.float32)
    dsh_acc = tl.zeros([BLOCK_D], tl.float32)
    if PER_SAMPLE:
        cur = tl.load(IDX + start)  # sample whose sums the register accumulator holds
    else:
        cur = 0
    for r0 in range(start, end, BLOCK_T):
        rows, rm = _rows_of(r0, end, BLOCK_T)
        m = rm[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sid = _sample_rows(IDX, rows, rm, PER_SAMPLE, BLOCK_T)
        mod = 1.0 + tl.load(S + sid[:, None] * ss + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(m, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        xhat = xc * rstd[:, None]
        g = dy * mod
        dx = rstd[:, None] * (g - (tl.sum(g, 1) / D)[:, None] - xhat * (tl.sum(g * xhat, 1) / D)[:, None])
        tl.store(DX + rows[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        cur0 = cur
        if HAS_DS:
            if PER_SAMPLE:
                ds_acc, cur = _segment_accumulate(ds_acc, cur0, dy * xhat, sid, rm, DS + pid * B * D, cols, cm, D)
            else:
                ds_acc += tl.sum(dy * xhat, 0)
        if HAS_DSH:
            if PER_SAMPLE:
                dsh_acc, cur = _segment_accumulate(dsh_acc, cur0, dy, sid, rm, DSH + pid * B * D, cols, cm, D)
            else:
                dsh_acc += tl.sum(dy, 0)
    if HAS_DS:
        if PER_SAMPLE:
            _add_into(DS + pid * B * D + cur * D + cols, ds_acc, cm)
        else:
            tl.store(DS + pid * D + cols, ds_acc, mask=cm)
    if HAS_DSH:
        if PER_SAMPLE:
            _add_into(DSH + pid * B * D + cur * D + cols, dsh_acc, cm)
        else:
            tl.store(DSH + pid * D + cols, dsh_acc, mask=cm)


def modulated_layer_norm_fwd(x, shift, scale, sample_index, eps: float, *, out=None, block_t: int | None = None):
    """x (T, D); shift (B, D) or None; scale (B, D) -> out (T, D) in promote(x, scale, shift) dtypes."""
    d = _check(x)
    x = _rows2d(x)
    T = x.shape[0]
    scale, per_sample, idx = _modulation(scale, sample_index, T, d, "scale")
    dtype = torch.promote_types(x.dtype, scale.dtype)
    if shift is not None:
        if shift.shape != scale.shape:
            raise ValueError(f"shift {tuple(shift.shape)} must match scale {tuple(scale.shape)}")
        shift = _rows2d(shift)
        dtype = torch.promote_types(dtype, shift.dtype)
    out = _out(out, x.shape, dtype, x)
    if T == 0:
        return out
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    sh = scale if shift is None else shift
    _mln_fwd[(triton.cdiv(T, bt),)](x, sh, scale, idx, out, T, d, x.stride(0), sh.stride(0), scale.stride(0),
                                   out.stride(0), eps, HAS_SHIFT=shift is not None, PER_SAMPLE=per_sample,
                                   BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return out


def modulated_layer_norm_bwd(grad, x, scale, sample_index, eps: float, *, need_scale: bool = True,
                             need_shift: bool = True, shift_dtype: torch.dtype | None = None, dx=None,
                             num_programs: int | None = None, block_t: int | None = None):
    """grad (T, D) -> (dx in x.dtype, dscale (B, D) in scale.dtype or None, dshift (B, D) in shift_dtype
    (default scale.dtype) or None). The shift itself is not needed: d out / d shift = 1."""
    d = _check(x)
    x, grad = _rows2d(x), _rows2d(grad)
    T, B = x.shape[0], scale.shape[0]
    scale, per_sample, idx = _modulation(scale, sample_index, T, d, "scale")
    dx = _out(dx, x.shape, x.dtype, x)
    bd = block_for(d, MAX_D)
    bt = _rows_per_tile(bd, T, block_t)
    P, R = _split_rows(T, bt, x.device, num_programs)
    ds = torch.zeros(P if need_scale else 1, B, d, dtype=torch.float32, device=x.device)
    dsh = torch.zeros(P if need_shift else 1, B, d, dtype=torch.float32, device=x.device)
    if T > 0:
        _mln_bwd[(P,)](grad, x, scale, idx, dx, ds, dsh, T, d, grad.stride(0), x.stride(0), scale.stride(0),
                       dx.stride(0), B, eps, R, PER_SAMPLE=per_sample, HAS_DS=need_scale, HAS_DSH=need_shift,
                       BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    dscale = ds.sum(0).to(scale.dtype) if need_scale else None
    dshift = dsh.sum(0).to(shift_dtype or scale.dtype) if need_shift else None
    return dx, dscale, dshift
