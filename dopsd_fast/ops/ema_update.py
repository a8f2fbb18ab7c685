"""ema_update: the EMA teacher update over many tensors in one pass per dtype group (tiers 2+3, no autograd)."""
from __future__ import annotations

import torch
from torch import Tensor

from dopsd_fast.ops._dispatch import backend_for
from dopsd_fast.ops.reference import ema_update_ref


@torch.library.custom_op("dopsd::ema_update", mutates_args=("teacher", "teacher_lowp"))
def _ema_update_op(teacher: list[Tensor], student: list[Tensor], teacher_lowp: list[Tensor], decay: float) -> None:
    # teacher_lowp == [] means no low-precision copy
    if not teacher:
        return
    backend = backend_for("ema_update" if teacher_lowp else "ema_update_fp32", *teacher, *student, *teacher_lowp)
    if backend == "cpp":
        torch.ops.dopsd_C.ema_update(teacher, student, teacher_lowp, decay)
    elif backend == "triton":
        from dopsd_fast._kernels import ema_update as _k
        _k.ema_update_(teacher, student, decay, teacher_lowp or None)
    else:
        ema_update_ref(teacher, student, decay, teacher_lowp or None)


@_ema_update_op.register_fake
def _(teacher, student, teacher_lowp, decay):
    return None


@torch.no_grad()
def ema_update(teacher: list[Tensor], student: list[Tensor], decay: float,
               teacher_lowp: list[Tensor | None] | None = None) -> None:
    """In place: teacher[i] <- teacher[i] + (1 - decay) * (student[i] - teacher[i]), then teacher_lowp[i] <- teacher[i].

    Args:
        teacher: contiguous fp32 tensors, the EMA master; updated in place.
        student: contiguous tensors of the same shapes, any of fp32 / bf16 / fp16 (the dtypes may mix); read only,
            upcast to fp32 in registers.
        decay: e.g. 0.9999; the weight 1 - decay is rounded to fp32 as torch.lerp does with a Scalar weight.
        teacher_lowp: optional list of contiguous same-shape fp32 / bf16 / fp16 tensors (e.g. the bf16 model weights),
            overwritten with the new master rounded to nearest even. A None entry is skipped (an fp32 teacher is its
            own master, as in method/ema.py); an entry must not alias its master (checked in eager mode).

    Matches ``torch._foreach_lerp_(teacher, [s.float() for s in student], 1 - decay)`` followed by
    ``teacher_lowp[i].copy_(teacher[i])`` bit for bit (both use torch.lerp's fused multiply-add per branch).
    All tensors on one device. Not differentiable; runs under no_grad. One kernel launch per
    (student dtype, teacher_lowp dtype) group.
    """
    lowp = list(teacher_lowp) if teacher_lowp is not None else [None] * len(teacher)
    if len(student) != len(teacher) or len(lowp) != len(teacher):
        raise ValueError("teacher, student (and teacher_lowp) must match one to one")
    for i, (t, s, low) in enumerate(zip(teacher, student, lowp)):
        if t.shape != s.shape or (low is not None and low.shape != t.shape):
            raise ValueError(f"tensor {i}: shapes differ ({tuple(t.shape)} vs {tuple(s.shape)})")
        if t.dtype != torch.float32:
            raise TypeError(f"tensor {i}: the EMA master must be fp32, got {t.dtype}")
        if low is not None and not torch.compiler.is_compiling() and low.data_ptr() == t.data_ptr():
            raise ValueError(f"teacher_lowp[{i}] aliases the fp32 master teacher[{i}]: pass None for it")
    copy = [low is not None for low in lowp]
    for with_copy in (True, False):   # at most two launches of the op: with and without the low-precision copy
        idx = [i for i, c in enumerate(copy) if c == with_copy]
        if idx:
            _ema_update_op([teacher[i] for i in idx], [student[i].detach() for i in idx],
                           [lowp[i] for i in idx] if with_copy else [], float(decay))
