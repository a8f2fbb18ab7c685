"""Per-step divergence between student and (stopped) teacher predictions at the student's state."""
from __future__ import annotations

import functools
import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.rollout_step import rollout_coefs, rollout_step
from .schedule import FlowConvention


# one batch (B, ...) as diffusers' pipelines hold it, or one tensor per sample (sizes may differ: our packed models)
Latents = Tensor | list[Tensor]


def flat(xs: Latents) -> Tensor:
    """Samples of different latent sizes as one vector, so a mean is over all elements of the batch."""
    if isinstance(xs, Tensor):
        return xs.reshape(-1)
    return xs[0].reshape(-1) if len(xs) == 1 else torch.cat([x.reshape(-1) for x in xs])


def rollout_loss(flow: FlowConvention, x: Latents, out_s: Latents, out_t: Latents, sigma: float,
                 kind: Literal["x0", "velocity"]) -> Tensor:
    """MSE(student, stopgrad(teacher)), mean over all elements: the definition :func:`rollout_update` fuses.

    ``x0``: as released, compares x0 = to_x0(x, out, sigma) (= sigma^2 * the velocity MSE, weighting early steps).
    ``velocity``: the paper's form, compares the raw outputs.
    """
    s, t, xf = flat(out_s), flat(out_t).detach(), flat(x)
    if kind == "x0":
        s, t = flow.to_x0(xf, s, sigma), flow.to_x0(xf, t, sigma)
    return F.mse_loss(s, t)


@functools.lru_cache(maxsize=16)
def packed_offsets(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """int32 (B+1,) offsets of samples of ``sizes`` elements in one flat buffer, on ``device``: the same for every
    step of a roll-out, so built (one host->device copy, which waits for the device) once per set of sizes."""
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device)


def rollout_update(flow: FlowConvention, x: Latents, out_s: Latents, out_t: Latents, sigma: float,
                   sigma_next: float, kind: Literal["x0", "velocity"]) -> tuple[Tensor, Latents]:
    """One roll-out step in one pass (``ops.rollout_step``): the divergence of :func:`rollout_loss` and the
    student's Euler step ``flow.euler(x, out_s, sigma, sigma_next)``.

    x, out_s, out_t: one batch (B, ...) or lists of B per-sample tensors, of the same shapes. Returns (loss: fp32
    scalar, differentiable in out_s only; next states: x's type and shapes, x's dtype, detached)."""
    batched = isinstance(x, Tensor)
    sizes = [x[0].numel()] * len(x) if batched else [xi.numel() for xi in x]
    device = x.device if batched else x[0].device
    cu = packed_offsets(tuple(sizes), device)
    step_coef, loss_coef = rollout_coefs(flow.sign, sigma, sigma_next, kind, len(x), device)
    x_next, sq_sum = rollout_step(flat(x), flat(out_s), flat(out_t).detach(), cu, step_coef, loss_coef)
    loss = sq_sum.sum() / sum(sizes)
    if batched:
        return loss, x_next.view(x.shape)
    return loss, [xn.view(xi.shape) for xn, xi in zip(x_next.split(sizes), x)]
