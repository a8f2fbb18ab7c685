"""Noise schedules and the flow convention that maps a model output to x0 and to the next Euler state.

Both model families follow x_sigma = (1 - sigma) * x0 + sigma * eps, but differ in what they are fed and what
they predict: Z-Image takes t = 1 - sigma and predicts x0 - eps; FLUX.2 takes t = sigma and predicts eps - x0.
A :class:`FlowConvention` holds that difference so the roll-out never branches on the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

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
FLUX2 = FlowConvention(sign=-1, time_is_sigma=True)


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """Turbo sampler schedule: s = linspace(1, 1/N, N), sigma = shift*s / (1 + (shift-1)*s), then 0 appended."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sig = shift * s / (1 + (shift - 1) * s)
    return [float(v) for v in sig] + [0.0]


def rollout_sigmas(sigmas: list[float]) -> list[float]:
    """Training roll-out schedule sigma_0 .. sigma_{K-1} with sigma_K = 0 appended."""
    return [float(s) for s in sigmas] + [0.0]


def empirical_mu(image_tokens: int, steps: int) -> float:
    """FLUX.2 [klein]'s time shift for ``image_tokens`` TARGET tokens (references excluded) and ``steps`` steps:
    a linear fit in both (BFL sampling.compute_empirical_mu); above 4300 tokens the step count is ignored."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_tokens > 4300:
        return a2 * image_tokens + b2
    m200, m10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    a = (m200 - m10) / 190.0
    return a * steps + (m200 - 200.0 * a)


def empirical_mu_sigmas(image_tokens: int, steps: int) -> list[float]:
    """klein's sampler (and the authors' training roll-out) schedule: t = linspace(1, 0, steps + 1) shifted by
    sigma = e^mu / (e^mu + 1/t - 1), ending at exactly 0. 1024^2 (4096 tokens), 4 steps: 1, .96738, .90814, .76720, 0."""
    if image_tokens < 1 or steps < 1:
        raise ValueError(f"need image_tokens >= 1 and steps >= 1, got {image_tokens}, {steps}")
    e = math.exp(empirical_mu(image_tokens, steps))
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    return [e / (e + 1.0 / t - 1.0) for t in ts[:-1]] + [0.0]
