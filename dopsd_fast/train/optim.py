"""The optimizer (optim.name) and its learning-rate schedule (optim.scheduler, optim.warmup_steps): a
``torch.optim.lr_scheduler.LambdaLR`` over its param groups, stepped once per optimizer step; its state goes into each
checkpoint's ``state.json``.

The factor is a pure function of the optimizer step, so a resumed run's learning rates equal an uninterrupted
run's: the saved ``last_epoch`` is checked against the checkpoint's step rather than trusted blindly.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from .._extras import require
from .config import Config


def build_optimizer(params: Iterable[torch.Tensor], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the fp32 trainable ``params``; optim.name=adamw8bit: torchao's AdamW8bit, whose moments of every
    tensor of >= 4096 values are 8-bit codes with one fp32 scale per 256 values (block-wise dynamic quantisation,
    arXiv 2110.02861): about 2 bytes of state per trainable value instead of 8, the weights still fp32. torchao over
    bitsandbytes: PyTorch's own library, written in torch and compiled by torch.compile (one graph per parameter
    shape, at the first step), so it runs, and is tested, on the CPU too; its state is a tensor subclass whose parts
    save and restore bit for bit (``state_entries``)."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    # its CUDA kernels' libraries fail to load on a CPU torch, each with a warning; the optimizer does not use them
    torchao_log = logging.getLogger("torchao")
    level, torchao_log.level = torchao_log.level, logging.ERROR
    try:
        lowbit = require("torchao.optim", "lowbit", "optim.name=adamw8bit")
    finally:
        torchao_log.setLevel(level)
    return lowbit.AdamW8bit(params, **kwargs)


def set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's learning rate: in place where it is a tensor (AdamW8bit keeps it so, for its compiled
    step, and refuses a float)."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def json_value(v: Any) -> Any:
    """An optimizer or scheduler state value as JSON holds it: tuples as lists, AdamW8bit's tensor learning rates
    as numbers."""
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    return v.item() if torch.is_tensor(v) else v


def state_entries(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer state tensor as checkpoint entries: itself, or an 8-bit moment's parts (``key.codes`` uint8,
    ``key.scale`` fp32 per block, ``key.qmap``: its code book), which ``join_state_entries`` turns back into the
    same moment bit for bit (dequantised fp32 would requantise to other block scales)."""
    if not hasattr(value, "__tensor_flatten__"):        # a plain tensor (torch.Tensor has no flatten protocol)
        return {key: value}
    attrs, _ = value.__tensor_flatten__()
    return {f"{key}.{attr}": getattr(value, attr) for attr in attrs}


def join_state_entries(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A parameter's state fields read back (``state_entries``' keys after ``name::``), 8-bit moments reassembled."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for field, t in fields.items():
        base, dot, attr = field.partition(".")
        if dot:
            parts.setdefault(base, {})[attr] = t
        else:
            out[field] = t
    for base, p in parts.items():
        if set(p) != {"codes", "scale", "qmap"}:
            raise ValueError(f"{base} has parts {sorted(p)}, expected codes, scale and qmap")
        state8 = require("torchao.optim.subclass_8bit", "lowbit", "an optim.name=adamw8bit checkpoint")
        # the code book of a signed moment (exp_avg) has negative codes, the unsigned one (exp_avg_sq) does not
        out[base] = state8.OptimState8bit(p["codes"], p["scale"], p["qmap"], signed=bool(p["qmap"].min() < 0),
                                          dtype=torch.float32)
    return out


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
        group["initial_lr"] = o.lr
        set_lr(group, o.lr)
    return LambdaLR(optimizer, lambda s: lr_factor(s, o.scheduler, o.warmup_steps, steps))


def scheduler_state(scheduler: LambdaLR) -> dict[str, Any]:
    """The JSON-able part of the scheduler's state (state.json "scheduler"); its lambda is rebuilt from the config."""
    return {k: json_value(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


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
        set_lr(group, lr)
    scheduler._last_lr = lrs
