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


def patchify(x: Tensor, p: int) -> Tensor:
    """(C, H, W) -> (C p^2, H/p, W/p), channel c * p^2 + i * p + j = x[c, p h + i, p w + j] (FLUX.2's order)."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3).reshape(c * p * p, h // p, w // p)


def unpatchify(z: Tensor, p: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    cpp, h, w = z.shape
    return z.reshape(cpp // (p * p), p, p, h, w).permute(0, 3, 1, 4, 2).reshape(-1, h * p, w * p)


class PatchedPixelLatents:
    """Pixel-space codec for tiny FLUX.2-architecture models: p x p pixel patches become channels (FLUX.2's
    patchify order), so (3, H, W) -> (3 p^2, H/p, W/p) token grids, as the VAE's 2x2 patchify does on its latents."""

    def __init__(self, patch: int):
        self.patch, self.channels = patch, 3 * patch * patch

    def encode(self, image: Tensor) -> Tensor:
        return patchify(image, self.patch)

    def decode(self, latent: Tensor) -> Tensor:
        return unpatchify(latent, self.patch).clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height // self.patch, width // self.patch)
