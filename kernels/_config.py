"""Launch heuristics shared by the Triton kernels."""
from __future__ import annotations

import triton

# Under TRITON_INTERPRET=1 every program instance costs ~ms on the CPU: kernels use few, large blocks there.
from dopsd_fast.ops._dispatch import interpreting  # noqa: F401  (re-exported for the kernels)


def block_for(n: int, cap: int = 4096) -> int:
    """A power-of-two block covering ``n`` elements, at most ``cap`` (``n`` is a row length or a chunk)."""
    return min(cap, triton.next_power_of_2(max(int(n), 1)))


def num_warps_for(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16
