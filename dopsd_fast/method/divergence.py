"""Per-step divergence between student and (stopped) teacher predictions at the student's state."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import FlowConvention


def flat(xs: list[Tensor]) -> Tensor:
    """Samples of different latent sizes as one vector, so a mean is over all elements of the batch."""
    return torch.cat([x.reshape(-1) for x in xs])


def rollout_loss(flow: FlowConvention, x: list[Tensor], out_s: list[Tensor], out_t: list[Tensor],
                 sigma: float, kind: Literal["x0", "velocity"]) -> Tensor:
    """MSE(student, stopgrad(teacher)), mean over all elements.

    ``x0``: as released, compares x0 = to_x0(x, out, sigma) (= sigma^2 * the velocity MSE, weighting early steps).
    ``velocity``: the paper's form, compares the raw outputs.
    """
    s, t, xf = flat(out_s), flat(out_t).detach(), flat(x)
    if kind == "x0":
        s, t = flow.to_x0(xf, s, sigma), flow.to_x0(xf, t, sigma)
    return F.mse_loss(s, t)
