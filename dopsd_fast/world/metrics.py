"""Exact measurements in a world drawn by a program: an evaluator CNN (shape / colour / background) and palette
purity, the share of pixels within 0.12 (L-inf, on a [0, 1] scale) of one of the world's 10 colours.

Clean renderings score 1.0 on purity; blur and averaged modes put pixels between palette colours, so purity
is the sharpness / quality measure (pixel MSE would reward blur).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .scene import BACKGROUNDS, COLOURS, PALETTE, SHAPES

PURITY_EPS = 0.24          # 0.12 on [0, 1] = 0.24 on [-1, 1]


def palette_purity(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B,) fraction of on-palette pixels."""
    dist = (images.clamp(-1, 1)[:, None] - PALETTE.view(1, -1, 3, 1, 1)).abs().amax(dim=2)   # (B, 10, H, W)
    return (dist.amin(dim=1) <= PURITY_EPS).float().mean(dim=(1, 2))


class Evaluator(nn.Module):
    """A small CNN with one head per attribute; trained on renderings with noise and blur (scripts/world_evaluator.py)."""

    heads = {"shape": len(SHAPES), "colour": len(COLOURS), "background": len(BACKGROUNDS)}

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(), nn.Flatten())
        self.out = nn.Linear(64 * 4 * 4, sum(self.heads.values()))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        logits = self.out(self.body(images)).split(list(self.heads.values()), dim=-1)
        return dict(zip(self.heads, logits))

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, list[str]]:
        names = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS)}
        return {k: [names[k][i] for i in v.argmax(-1).tolist()] for k, v in self(images.clamp(-1, 1)).items()}
