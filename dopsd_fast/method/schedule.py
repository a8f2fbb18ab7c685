"""Noise schedules and the flow convention that maps a model output to x0 and to the next Euler state.

Both model families follow x_sigma = (1 - sigma) * x0 + sigma * eps, but differ in what they are fed and what
they predict: Z-Image takes t = 1 - sigma and predicts x0 - eps; FLUX.2 takes t = sigma and predicts eps - x0.
A :class:`FlowConvention` holds that difference so the roll-out never branches on the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlowConvention:
    sign: int               # model output = sign * (x0 - eps)
    time_is_sigma: bool     # model time input: sigma (FLUX.2) or 1 - sigma (Z-Image)

    def time(self, sigma: Tensor) -> Tensor:
        return sigma if self.time_is_sigma else 1.0 - sigma

    def to_x0(self, x: Tensor, out: Tensor, sigma: float | Tensor) -> Tensor:
        return x + self.sign * sigma * out

    def euler(self, x: Tensor, out: Tensor, sigma: float, sigma_next: float) -> Tensor:
        # x_next = x + (sigma_next - sigma) * d x / d sigma, with d x / d sigma = eps - x0 = -sign * out
        return x + self.sign * (sigma - sigma_next) * out

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        """Flow-matching regression target for the SFT baseline."""
        return self.sign * (x0 - eps)


Z_IMAGE = FlowConvention(sign=1, time_is_sigma=False)


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """Turbo sampler schedule: s = linspace(1, 1/N, N), sigma = shift*s / (1 + (shift-1)*s), then 0 appended."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sig = shift * s / (1 + (shift - 1) * s)
    return [float(v) for v in sig] + [0.0]


def rollout_sigmas(sigmas: list[float]) -> list[float]:
    """Training roll-out schedule sigma_0 .. sigma_{K-1} with sigma_K = 0 appended."""
    return [float(s) for s in sigmas] + [0.0]
