"""Multi-tensor EMA: teacher <- lerp(teacher, student, 1 - decay), plus an optional low-precision copy (tier 1a).

One launch per (student dtype, low-precision dtype) group, however many tensors: the launcher cuts every tensor
into chunks of BLOCK elements and writes a device table with one int64 row per chunk,
``[teacher_ptr, student_ptr, teacher_lowp_ptr, n]`` (addresses already offset to the chunk's first element).
Program c loads row c, casts the addresses to typed pointers and updates ``n <= BLOCK`` elements. The table
depends only on the addresses and sizes, so it is cached on exactly those (no host->device copy per step while
the parameters stay where they are).

Per element: one fp32 read of the master, one read of the student, one fp32 write, one low-precision write:
the two passes of ``_foreach_lerp_`` + ``copy_`` (and the student's ``.float()`` copy) fused into one.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._config import interpreting, num_warps_for, round_fp32_to

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, bool]] = OrderedDict()
_TABLE_CACHE_SIZE = 16


@triton.jit
def _fma(a, b, c, VIA_FP64: tl.constexpr):
    """a * b + c in fp32 with one rounding. The interpreter's tl.fma rounds twice (numpy a*b+c), so there the product
    is formed exactly in fp64 instead (24+24 bits < 53) and the sum rounded to fp32 (double rounding only on ties).
    tl.fma does not broadcast: a, b, c have the same shape."""
    if VIA_FP64:
        r = (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        r = tl.fma(a, b, c)
    return r


@triton.jit
def _lerp_chunk(t_ptrs, s_ptrs, l_ptrs, m, coef, LOWP_DTYPE: tl.constexpr, WRITE_LOWP: tl.constexpr,
                SMALL_WEIGHT: tl.constexpr, FMA_VIA_FP64: tl.constexpr, BLOCK: tl.constexpr):
    # m: a (BLOCK,) mask, or None for a full chunk (then aligned loads vectorise)
    t = tl.load(t_ptrs, mask=m)
    s = tl.load(s_ptrs, mask=m).to(tl.float32)
    d = s - t
    c = tl.full([BLOCK], coef, tl.float32)
    # torch.lerp's two branches, each a fused multiply-add as in ATen's vectorised CPU kernel (bit-identical)
    if SMALL_WEIGHT:
        r = _fma(d, c, t, FMA_VIA_FP64)      # t + w (s - t)
    else:
        r = _fma(-d, c, s, FMA_VIA_FP64)     # s - (1 - w)(s - t)
    tl.store(t_ptrs, r, mask=m)
    if WRITE_LOWP:
        tl.store(l_ptrs, round_fp32_to(r, LOWP_DTYPE), mask=m)


@triton.jit
def _ema_update_kernel(
    table_ptr,                      # (num_chunks, 4) int64: teacher addr, student addr, lowp addr, n
    coef,                           # fp32: w = 1 - decay if SMALL_WEIGHT else 1 - w (rounded as ATen does)
    STUDENT_DTYPE: tl.constexpr,
    LOWP_DTYPE: tl.constexpr,
    WRITE_LOWP: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,     # weight < 0.5: the branch torch.lerp takes
    ALIGNED: tl.constexpr,          # every address in the table is 16-byte aligned
    FMA_VIA_FP64: tl.constexpr,     # interpreter only
    BLOCK: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4
    offs = tl.arange(0, BLOCK)
    # addresses loaded from memory carry no alignment: hint it on the pointer blocks so full chunks use 16-byte accesses
    t_ptrs = tl.load(row).to(tl.pointer_type(tl.float32)) + offs
    s_ptrs = tl.load(row + 1).to(tl.pointer_type(STUDENT_DTYPE)) + offs
    if ALIGNED:
        t_ptrs = tl.max_contiguous(tl.multiple_of(t_ptrs, 16), BLOCK)
        s_ptrs = tl.max_contiguous(tl.multiple_of(s_ptrs, 16), BLOCK)
    if WRITE_LOWP:
        l_ptrs = tl.load(row + 2).to(tl.pointer_type(LOWP_DTYPE)) + offs
        if ALIGNED:
            l_ptrs = tl.max_contiguous(tl.multiple_of(l_ptrs, 16), BLOCK)
    else:
        l_ptrs = t_ptrs                     # unused
    n = tl.load(row + 3)
    if n == BLOCK:
        _lerp_chunk(t_ptrs, s_ptrs, l_ptrs, None, coef, LOWP_DTYPE, WRITE_LOWP, SMALL_WEIGHT, FMA_VIA_FP64, BLOCK)
    else:                                   # the last chunk of a tensor
        _lerp_chunk(t_ptrs, s_ptrs, l_ptrs, offs < n, coef, LOWP_DTYPE, WRITE_LOWP, SMALL_WEIGHT, FMA_VIA_FP64,
                    BLOCK)


def _chunk_table(teacher, student, lowp, block: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(num_chunks, 4) int64 on ``device``, one row per BLOCK-element chunk of every non-empty tensor, and whether
    every row's addresses are 16-byte aligned (bases aligned; chunk offsets are BLOCK elements >= 16 bytes)."""
    ts, ss = teacher[0].element_size(), student[0].element_size()
    ls = lowp[0].element_size() if lowp else 0
    key = (device, block, ts, ss, ls, tuple(
        (t.data_ptr(), s.data_ptr(), l.data_ptr() if lowp else 0, t.numel())
        for t, s, l in zip(teacher, student, lowp if lowp else teacher)))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    rows = []
    for tp, sp, lp, n in key[-1]:
        for off in range(0, n, block):
            rows.append((tp + off * ts, sp + off * ss, lp + off * ls if lowp else 0, min(block, n - off)))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)
    aligned = all(a % 16 == 0 for row in key[-1] for a in row[:3]) and block * min(ts, ss, ls or ts) % 16 == 0
    _TABLE_CACHE[key] = (table, aligned)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table, aligned


def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float,
                teacher_lowp: list[torch.Tensor] | None = None, *, block: int | None = None) -> None:
    """In place: teacher[i] <- teacher[i] + (1 - decay) (student[i] - teacher[i]); teacher_lowp[i] <- teacher[i].

    teacher: contiguous fp32 tensors; student: contiguous, same shapes, fp32/bf16/fp16 (may mix);
    teacher_lowp: None or contiguous same-shape fp32/bf16/fp16 tensors that do not alias the teacher.
    """
    lowp = list(teacher_lowp) if teacher_lowp else []
    assert len(student) == len(teacher) and (not lowp or len(lowp) == len(teacher)), "lists must match one to one"
    if not teacher:
        return
    device = teacher[0].device
    for i, (t, s) in enumerate(zip(teacher, student)):
        assert t.dtype == torch.float32 and s.dtype in _TL_DTYPE, f"tensor {i}: teacher fp32, student float"
        assert t.shape == s.shape and t.is_contiguous() and s.is_contiguous(), f"tensor {i}: shape / layout"
        assert t.device == device and s.device == device
        if lowp:
            low = lowp[i]
            assert low.shape == t.shape and low.dtype in _TL_DTYPE and low.is_contiguous() and low.device == device
            assert low.data_ptr() != t.data_ptr(), f"tensor {i}: teacher_lowp aliases the fp32 teacher"
    BLOCK = block or 4096
    # ATen's lerp with a Scalar weight: w = fp32(1 - decay); the large-weight branch uses fp32(1 - w)
    weight = torch.tensor(1.0 - decay, dtype=torch.float32)
    small = bool(weight.abs() < 0.5)
    coef = float(weight if small else torch.tensor(1.0, dtype=torch.float32) - weight)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(student):
        groups.setdefault((s.dtype, lowp[i].dtype if lowp else None), []).append(i)
    for (s_dtype, l_dtype), idx in groups.items():
        table, aligned = _chunk_table([teacher[i] for i in idx], [student[i] for i in idx],
                             [lowp[i] for i in idx] if lowp else None, BLOCK, device)
        if table.shape[0] == 0:
            continue
        _ema_update_kernel[(table.shape[0],)](
            table, coef,
            STUDENT_DTYPE=_TL_DTYPE[s_dtype], LOWP_DTYPE=_TL_DTYPE[l_dtype or torch.float32],
            WRITE_LOWP=bool(lowp), SMALL_WEIGHT=small, ALIGNED=aligned, FMA_VIA_FP64=interpreting(),
            BLOCK=BLOCK, num_warps=num_warps_for(BLOCK),
        )

