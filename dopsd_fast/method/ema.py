"""Teacher <- EMA(student) after every optimizer step.

The EMA is accumulated in fp32 (method.md, default 4): with decay 0.9999 a bf16 teacher would round most
1e-4 increments away. When the teacher tensors are fp32 they are their own master copy.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.ema_update import ema_update


class EMATeacher:
    def __init__(self, teacher: dict[str, Tensor], student: list[Tensor]):
        """``teacher``: name -> tensor (the names key the checkpoint); ``student``: the matching tensors, in order."""
        self.names = list(teacher)
        self.teacher = list(teacher.values())
        self.student = list(student)
        if len(self.teacher) != len(self.student) or any(t.shape != s.shape for t, s in zip(self.teacher, self.student)):
            raise ValueError("teacher and student parameter lists must match one to one in shape")
        self.master = [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in self.teacher]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        # m <- m + (1 - decay) * (s - m) for every tensor, and low-precision teachers rounded from m, in one pass
        lowp = [None if t.data_ptr() == m.data_ptr() else t for t, m in zip(self.teacher, self.master)]
        ema_update(self.master, [s.detach() for s in self.student], decay, lowp)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.master))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [k for k in self.names if k not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for t, m, k in zip(self.teacher, self.master, self.names):
            m.copy_(state[k])
            if t.data_ptr() != m.data_ptr():
                t.copy_(m)
