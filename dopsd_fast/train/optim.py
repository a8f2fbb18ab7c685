"""The learning-rate schedule (optim.scheduler, optim.warmup_steps): a ``torch.optim.lr_scheduler.LambdaLR`` over
AdamW's param groups, stepped once per optimizer step; its state goes into each checkpoint's ``state.json``.

The factor is a pure function of the optimizer step, so a resumed run's learning rates equal an uninterrupted
run's: the saved ``last_epoch`` is checked against the checkpoint's step rather than trusted blindly.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import Config


def lr_factor(step: int, scheduler: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of optim.lr for optimizer step ``step`` (0-based): (step + 1) / W during the warm-up (the first
    step already trains), then 1 (constant) or a decay over the D = total - W steps after it, d = step - W:
    (D - d) / D (linear) or (1 + cos(pi d / D)) / 2 (cosine). Past ``total_steps`` a decay stays at its last value."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    d = min(step - warmup_steps, span - 1)
    if scheduler == "linear":
        return (span - d) / span
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * d / span))
    raise ValueError(f"optim.scheduler: unknown schedule {scheduler!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> LambdaLR:
    """A LambdaLR at step 0 over ``optimizer``, whose groups start from optim.lr (any lr set before is replaced):
    its ``get_last_lr()`` is the learning rate of the coming optimizer step."""
    o, steps = cfg.optim, cfg.train.steps
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = o.lr
    return LambdaLR(optimizer, lambda s: lr_factor(s, o.scheduler, o.warmup_steps, steps))


def scheduler_state(scheduler: LambdaLR) -> dict[str, Any]:
    """The JSON-able part of the scheduler's state (state.json "scheduler"); its lambda is rebuilt from the config."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler(scheduler: LambdaLR, state: dict[str, Any] | None, step: int, where: str) -> None:
    """Restore ``scheduler`` at optimizer step ``step`` from its saved state (None: a checkpoint older than the
    schedule, at ``step`` all the same); a state whose position is not ``step`` is refused, naming ``where``."""
    from .checkpoint import CheckpointError     # checkpoint.py imports the config, not this module
    if state is None:
        state = {"last_epoch": step, "_step_count": step + 1}
    if not isinstance(state, dict) or state.get("last_epoch") != step:
        raise CheckpointError(f"{where}: scheduler is {state!r}, expected last_epoch {step} (the checkpoint's step); "
                              "the file was edited or not written by `dopsd train`: resume from another checkpoint")
    own = scheduler.state_dict()
    scheduler.load_state_dict({**own, **{k: v for k, v in state.items() if k in own and k != "lr_lambdas"}})
    # the learning rate of the coming step, from this run's lambda (the config's schedule and train.steps)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
