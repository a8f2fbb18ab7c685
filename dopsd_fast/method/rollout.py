"""The K-step on-policy roll-out of D-OPSD for any teacher and student: two callables over one batch of latents.

``dopsd_step`` (step.py) runs it with our Roles; another trainer passes its own callables, e.g. one diffusers
transformer with two PEFT adapters (README, "Use the ops in your trainer"). Each step is one ``rollout_update``: the
fused op (``ops.rollout_step``) forms the divergence to the stopped teacher and the student's Euler step in one pass.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .divergence import Latents, rollout_update
from .schedule import FlowConvention

# f(x, t) -> the model's prediction, of x's type and shapes; t: fp32 (B,) model time on x's device
Predict = Callable[[Latents, Tensor], Latents]


def distill_rollout(teacher: Predict, student: Predict, x: Latents, sigmas: Sequence[float], flow: FlowConvention,
                    loss_kind: Literal["x0", "velocity"] = "x0", per_step_backward: bool = True,
                    backward: Callable[[Tensor], object] = Tensor.backward, weight: float = 1.0) -> Tensor:
    """Roll the student out from the noise ``x`` for K = len(sigmas) - 1 steps; accumulates grad of mean_k loss_k.

    At step k both roles predict at the student's state x_k and time ``flow.time(sigma_k)``; loss_k = MSE(student,
    stopgrad(teacher)) over all elements of the batch (x0-space as released, or velocity); x_{k+1} is the student's
    Euler step, detached (no backpropagation through the roll-out).

    Args:
        teacher, student: ``f(x, t) -> prediction``, prediction of x's type and shapes; t: fp32 (B,) model time
            (``flow.time``) on x's device. The teacher runs under ``torch.no_grad``, the student with autograd.
        x: the noise at sigma_0: one batch (B, ...) as diffusers' pipelines hold it, or a list of B per-sample
            tensors whose sizes may differ (our packed models); any float dtype; not modified.
        sigmas: sigma_0 > ... > sigma_K = 0 (``schedule.rollout_sigmas``, ``empirical_mu_sigmas``).
        flow: the model's convention: ``Z_IMAGE`` (t = 1 - sigma, predicts x0 - eps) or ``FLUX2`` (t = sigma,
            predicts eps - x0).
        per_step_backward: ``backward(loss_k / K * weight)`` right after step k, so one student graph is alive at a
            time; the gradient equals that of the mean because every state is detached. False keeps the K graphs
            for one backward of the mean after the last step, as the released loop does.
        backward: runs each backward on a scalar (a DeepSpeed engine passes ``engine.backward``).
        weight: multiplies the gradient (1 / N for one of N iterations accumulated into one optimizer step).

    Returns loss_k per step: fp32 (K,), detached, on x's device (read it once: no host sync happens in here).
    """
    K = len(sigmas) - 1
    device = (x if isinstance(x, Tensor) else x[0]).device
    held = []
    for k in range(K):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        t = flow.time(torch.full((len(x),), sigma, dtype=torch.float32, device=device))
        with torch.no_grad():
            out_t = teacher(x, t)
        out_s = student(x, t)
        loss_k, x = rollout_update(flow, x, out_s, out_t, sigma, sigma_next, loss_kind)   # x: next state, detached
        if per_step_backward:
            backward(loss_k / K * weight)
        held.append(loss_k.detach() if per_step_backward else loss_k)
    if not per_step_backward:
        backward(torch.stack(held).sum() / K * weight)
    return torch.stack(held).detach()
