"""Teacher and student: one network, two roles.

The student sees the text context c_s and is trained; the teacher sees the privileged context c_t and is an
EMA of the student, run without autograd. ``LoRARoles`` keeps one frozen base with two adapters;
``FullRoles`` keeps a second, frozen copy of all weights.

Trainable weights are fp32 whatever ``model.dtype`` is: LoRA adapters are fp32 themselves (nn/lora_linear.py); a
low-precision model trained in full keeps fp32 masters (``master_weights.py``) unless DeepSpeed's optimizer does.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..nn.lora_linear import adapter_parameters, inject_lora, lora_layers, set_active_adapter
from .ema import EMATeacher
from .master_weights import MasterWeights


class Roles:
    student_model: nn.Module
    teacher_model: nn.Module
    ema: EMATeacher
    trainable: dict[str, nn.Parameter]     # what the optimizer holds and the checkpoint saves as "student"

    def use(self, role: str) -> nn.Module:
        return self.student_model if role == "student" else self.teacher_model

    def context(self, role: str, feats: list[Tensor]):
        """Caption path (depends on neither x nor t): computed once per iteration per role."""
        model = self.use(role)
        if role == "teacher":
            with torch.no_grad():
                return model.encode_context(feats)
        return model.encode_context(feats)

    def teacher(self, x: list[Tensor], t: Tensor, ctx) -> list[Tensor]:
        with torch.no_grad():
            return self.use("teacher")(x, t, context=ctx)

    def student(self, x: list[Tensor], t: Tensor, ctx) -> list[Tensor]:
        return self.use("student")(x, t, context=ctx)

    def trainable_changed(self) -> None:
        """After the optimizer step or a checkpoint load changed ``trainable``: the forwards read it from now on."""

    def update_teacher(self, decay: float) -> None:
        self.ema.update(decay)


class LoRARoles(Roles):
    def __init__(self, model: nn.Module, targets: list[str], rank: int, alpha: float):
        model.requires_grad_(False)
        self.targets = inject_lora(model, targets, ["student", "teacher"], rank, alpha)
        student, teacher = adapter_parameters(model, "student"), adapter_parameters(model, "teacher")
        assert [k.replace(".student", ".teacher") for k in student] == list(teacher)
        with torch.no_grad():
            for s, t in zip(student.values(), teacher.values()):
                t.copy_(s)          # teacher starts as the student, i.e. as the exact base model
        for p in student.values():
            p.requires_grad_(True)
        for p in teacher.values():      # new parameters default to requires_grad=True; the teacher is never trained
            p.requires_grad_(False)
        self.model = self.student_model = self.teacher_model = model
        self.layers = lora_layers(model)        # the modules use() switches, listed once
        self.trainable = student
        self.ema = EMATeacher(teacher, list(student.values()))

    def use(self, role: str) -> nn.Module:
        set_active_adapter(self.model, role, self.layers)
        return self.model


class FullRoles(Roles):
    def __init__(self, model: nn.Module, fp32_masters: bool = True, copy_model=copy.deepcopy):
        """``fp32_masters``: keep fp32 master weights when the model is in a lower precision (False where DeepSpeed's
        optimizer keeps them); ``copy_model(model)``: the teacher's copy of it (ZeRO-3: a partitioned one)."""
        self.student_model = model.requires_grad_(True)
        self.teacher_model = copy_model(model).requires_grad_(False)
        params = dict(model.named_parameters())
        lowp = any(p.dtype != torch.float32 for p in params.values())
        self.masters = MasterWeights(params) if fp32_masters and lowp else None
        self.trainable = params if self.masters is None else self.masters.masters
        self.ema = EMATeacher(dict(self.teacher_model.named_parameters()), list(self.trainable.values()))

    def trainable_changed(self) -> None:
        if self.masters is not None:
            self.masters.copy_to_model()


def detached_context(ctx):
    """A leaf copy of a context whose tokens collect gradient over the K roll-out steps (see step.py)."""
    if not ctx.tokens.requires_grad:
        return ctx
    return dataclasses.replace(ctx, tokens=ctx.tokens.detach().requires_grad_(True))
