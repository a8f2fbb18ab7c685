"""Launch heuristics and small @triton.jit helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """TRITON_INTERPRET=1: every program instance costs ~ms on the CPU, so kernels use few, large blocks there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_for(n: int, cap: int = 4096) -> int:
    """A power-of-two block covering ``n`` elements, at most ``cap`` (``n`` is a row length or a chunk)."""
    return min(cap, triton.next_power_of_2(max(int(n), 1)))


def num_warps_for(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@triton.jit
def round_fp32_to(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. bf16 is rounded by hand: the interpreter's fp32->bf16 cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, v.to(tl.bfloat16), bits.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        r = v.to(DTYPE)
    return r
