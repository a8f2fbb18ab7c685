"""Latent codecs: image (3, H, W) in [-1, 1] <-> DiT latent (C, F=1, h, w)."""
from __future__ import annotations

from torch import Tensor


class PixelLatents:
    """Identity codec for the tiny default: the DiT works in pixel space (3 channels, no VAE)."""

    channels = 3

    def encode(self, image: Tensor) -> Tensor:
        return image.unsqueeze(1)

    def decode(self, latent: Tensor) -> Tensor:
        return latent.squeeze(1).clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, 1, height, width)
