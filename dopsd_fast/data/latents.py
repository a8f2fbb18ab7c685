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


class PatchedPixelLatents:
    """Pixel-space codec for tiny FLUX.2-architecture models: p x p pixel patches become channels, in FLUX.2's
    patchify order (channel c * p * p + i * p + j), so (3, H, W) -> (3 p^2, H/p, W/p) token grids, as the VAE's
    2x2 patchify does on its latents."""

    def __init__(self, patch: int):
        self.patch, self.channels = patch, 3 * patch * patch

    def encode(self, image: Tensor) -> Tensor:
        c, h, w, p = *image.shape, self.patch
        return image.reshape(c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3).reshape(c * p * p, h // p, w // p)

    def decode(self, latent: Tensor) -> Tensor:
        cpp, h, w, p = *latent.shape, self.patch
        image = latent.reshape(cpp // (p * p), p, p, h, w).permute(0, 3, 1, 4, 2).reshape(-1, h * p, w * p)
        return image.clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height // self.patch, width // self.patch)
