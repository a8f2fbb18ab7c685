"""Memory as the trainer plans it: activations autograd saves (live and peak), the resident set, the budget.

Device-independent (works on CPU, where there is no allocator high-water mark), so the per-step-backward
saving can be measured in tests and in bench/ alike. Parameters saved by ops (e.g. a Linear's weight) are
not activations and are not counted. ``model.checkpointing=auto`` sizes its plan from ``resident_bytes`` and the
blocks it measured (models/checkpointing.py) against ``train.memory_budget_gb``.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..method.roles import Roles
from ..models.checkpointing import CheckpointPlan
from .config import Config, ConfigError


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    def __init__(self, *modules: nn.Module):
        self._param_storages = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self._param_storages or t.device.type == "meta":
            return t
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = _Saved(t)
        weakref.finalize(box, self._release, n)   # runs when autograd drops the saved tensor
        return box

    def _release(self, n: int) -> None:
        self.live -= n

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> "ActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def resident_bytes(roles: Roles, optimizer: torch.optim.Optimizer) -> int:
    """Bytes an iteration holds besides activations: both roles' weights, the trainable weights, the EMA master and
    the optimizer state (AdamW creates it in its first step: call this after one), plus the trainable weights'
    gradients, which live from the first backward to the optimizer step."""
    held = [*roles.student_model.parameters(), *roles.teacher_model.parameters(), *roles.trainable.values(),
            *roles.ema.master, *optimizer_tensors(optimizer)]
    return unique_bytes(held) + unique_bytes(roles.trainable.values())


def checkpoint_plan(cfg: Config, device: torch.device) -> CheckpointPlan:
    """``model.checkpointing`` as a plan; auto's budget is ``train.memory_budget_gb``, else the whole CUDA device."""
    mode, budget_gb = cfg.model.checkpointing, cfg.train.memory_budget_gb
    if mode != "auto":
        return CheckpointPlan(mode)
    if budget_gb is not None:
        return CheckpointPlan(mode, budget=int(budget_gb * 2**30))
    if device.type != "cuda":
        raise ConfigError(f"train.memory_budget_gb: model.checkpointing=auto on {device} needs a budget (only a CUDA "
                          "device's size is known), e.g. --set train.memory_budget_gb=16")
    return CheckpointPlan(mode, budget=torch.cuda.get_device_properties(device).total_memory)


def fit_checkpointing(plan: CheckpointPlan, roles: Roles, optimizer: torch.optim.Optimizer, cfg: Config,
                      rollout_steps: int) -> CheckpointPlan:
    """auto's plan for the rest of the run, after the first iteration (fully checkpointed, every block measured) and
    its optimizer step. Without per-step backward the K roll-out steps' student graphs are alive together."""
    graphs = 1 if cfg.method.per_step_backward or cfg.method.objective == "sft" else rollout_steps
    return plan.fit(resident_bytes(roles, optimizer), graphs)
