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


def flat(xs: list[Tensor]) -> Tensor:
    """Samples of different latent sizes as one vector, so a mean is over all elements of the batch."""
    return xs[0].reshape(-1) if len(xs) == 1 else torch.cat([x.reshape(-1) for x in xs])


def rollout_loss(flow: FlowConvention, x: list[Tensor], out_s: list[Tensor], out_t: list[Tensor],
                 sigma: float, kind: Literal["x0", "velocity"]) -> Tensor:
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


def rollout_update(flow: FlowConvention, x: list[Tensor], out_s: list[Tensor], out_t: list[Tensor], sigma: float,
                   sigma_next: float, kind: Literal["x0", "velocity"]) -> tuple[Tensor, list[Tensor]]:
    """One roll-out step in one pass (``ops.rollout_step``): the divergence of :func:`rollout_loss` and the
    student's Euler step ``flow.euler(x, out_s, sigma, sigma_next)``; returns (loss, next states)."""
    sizes = [xi.numel() for xi in x]
    cu = packed_offsets(tuple(sizes), x[0].device)
    step_coef, loss_coef = rollout_coefs(flow.sign, sigma, sigma_next, kind, len(x), x[0].device)
    x_next, sq_sum = rollout_step(flat(x), flat(out_s), flat(out_t).detach(), cu, step_coef, loss_coef)
    return sq_sum.sum() / sum(sizes), [xn.view(xi.shape) for xn, xi in zip(x_next.split(sizes), x)]
