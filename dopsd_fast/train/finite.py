"""NaN/Inf in a run: a step whose loss or gradient norm is not finite updates nothing, and a run of them ends training.

A non-finite loss (a learning rate that blew the weights up, a NaN in a batch) would otherwise train NaN into every
weight, the EMA teacher and every later checkpoint while the run exits 0. The trainer checks the two numbers it
has on the host anyway (the loss after ``dopsd_step``'s one sync, the gradient norm from the clip) and on a bad
step drops the gradients instead of stepping AdamW and the EMA (``BadSteps``); ``train.max_bad_steps`` bad steps
in a row raise :class:`TrainingDiverged` (``dopsd train`` exits 3). Checkpoints and exports refuse to write a
non-finite tensor and loads refuse to read one (``models.loading.first_nonfinite``); ``strict_row`` keeps
``metrics.jsonl`` standard JSON.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from ..models.loading import first_nonfinite
from .checkpoint import CheckpointError

EXIT_DIVERGED = 3   # `dopsd train` on TrainingDiverged; 0 done, 1 a crash, 2 bad input, 75 stopped (stop.py)


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient norm; the message names the
    steps and what to change."""


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)      # None: a norm DeepSpeed does not report (ZeRO-0 in fp32)


class BadSteps:
    """Steps whose update was skipped for a non-finite loss or gradient norm: ``total`` in the run, ``streak`` in
    a row up to the last step, ``skipped`` for the last step. Part of the checkpoint state, so a resumed run keeps
    counting."""

    def __init__(self, limit: int):
        self.limit, self.total, self.streak, self.skipped = limit, 0, 0, False
        self.last: tuple[float, float | None] = (0.0, None)

    def check(self, loss: float, grad_norm: float | None) -> bool:
        """Whether the step may update (both finite); counts it when not."""
        self.skipped = not (_finite(loss) and _finite(grad_norm))
        if self.skipped:
            self.total, self.streak, self.last = self.total + 1, self.streak + 1, (loss, grad_norm)
        else:
            self.streak = 0
        return not self.skipped

    def fields(self) -> dict[str, Any]:
        """The metrics row's part: whether this step's update was skipped, and the run's count so far."""
        return {"skipped": self.skipped, "bad_steps": self.total}

    def raise_if_diverged(self, step: int, lr: float) -> None:
        """After logging step ``step``: TrainingDiverged once ``limit`` steps in a row were bad."""
        if self.streak < self.limit:
            return
        first = step - self.streak + 1
        loss, norm = self.last
        raise TrainingDiverged(
            f"{_steps(first, step)}: {self.streak} steps in a row had a non-finite loss or gradient norm (last: loss "
            f"{loss}, grad_norm {norm}; train.max_bad_steps={self.limit}); their updates were skipped and no "
            f"checkpoint of step {step} was written. Either the weights diverged (optim.lr={lr:g} too high? lower "
            "it or raise optim.warmup_steps) or the data holds NaN/Inf (check the images, captions and "
            f"data.cache_dir). Then {_restart(first, step)}")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "streak": self.streak}

    def load_state_dict(self, state: dict[str, int] | None, where: Path | str = "state.json") -> None:
        """``state``: as ``state_dict`` wrote it into ``where``; None (a checkpoint of an older version) counts
        from zero."""
        state = {} if state is None else state
        counts = [state.get(k, 0) for k in ("total", "streak")] if isinstance(state, dict) else None
        if counts is None or not all(type(n) is int and n >= 0 for n in counts) or counts[1] > counts[0]:
            raise CheckpointError(f"{where}: bad_steps is {json.dumps(state)}, expected "
                                  '{"total": N, "streak": M} with 0 <= M <= N; resume from an earlier checkpoint')
        self.total, self.streak = counts


def _steps(first: int, last: int) -> str:
    return f"step {last}" if first == last else f"steps {first}-{last}"


def _restart(first: int, step: int) -> str:
    if first == 1:
        return "start over (--set train.resume=null): no step of this run updated the weights"
    return (f"resume from an earlier checkpoint (--set train.resume=PATH; those of steps {first - 1}-{step - 1} all "
            f"hold the weights after step {first - 1}, whose update may be the one that diverged) or start over "
            "(--set train.resume=null)")


@contextlib.contextmanager
def inner_step_guard(optimizer: torch.optim.Optimizer, skip: bool, check_grads: bool) -> Iterator[dict[str, bool]]:
    """Inside, ``optimizer.step()`` (the AdamW a DeepSpeed engine wraps) does nothing when ``skip`` or, with
    ``check_grads``, when a gradient it would apply is not finite. Yields ``{"ran": ..., "bad_grads": ...}``.

    A DeepSpeed engine's ``step()`` finishes the gradient reduction, applies the update and then drops the
    accumulated gradients (ZeRO partitions and buffers included); skipping the whole call would leave them to
    add into the next iteration's. So a skipped update still calls ``engine.step()``, with the inner AdamW step
    (moments, step count, weight decay) left out: the weights come back unchanged. ``check_grads`` is for ZeRO-0,
    where DeepSpeed checks no gradient and every rank holds the same whole, reduced gradients; ZeRO 1-3 drop a
    step with a non-finite global norm themselves and never reach this step.
    """
    result = {"ran": False, "bad_grads": False}
    original = optimizer.step

    def step(*args, **kwargs):
        if check_grads and not result["bad_grads"]:
            grads = {str(i): p.grad for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
                     if p.grad is not None}
            result["bad_grads"] = first_nonfinite(grads) is not None
        if skip or result["bad_grads"]:
            return None
        result["ran"] = True
        return original(*args, **kwargs)

    optimizer.step = step       # an instance attribute shadows the class's (hooked) step for this call only
    try:
        yield result
    finally:
        del optimizer.step


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with each NaN/Inf number (also inside lists) replaced by null and ``nonfinite``: the names of the
    fields that held one (only when some did), so ``json.dumps(allow_nan=False)`` writes standard JSON that any
    parser reads (Python's default writes the bare NaN / Infinity tokens that strict parsers reject)."""
    def bad(value) -> bool:
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, (list, tuple)):
            return any(map(bad, value))
        return isinstance(value, dict) and any(map(bad, value.values()))

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    names = [k for k, v in row.items() if bad(v)]
    if not names:
        return row
    return {**{k: clean(v) for k, v in row.items()}, "nonfinite": names}
