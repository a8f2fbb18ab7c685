"""Latent codec over diffusers' AutoencoderKL: image (3, H, W) in [-1, 1] <-> DiT latent (C, 1, H/f, W/f).

Z-Image: latent = (mode(enc(image)) - shift) * scale, decode(latent / scale + shift) (models.md 2.6). The
posterior mode, not a sample, so cached latents are deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor


class VaeLatents:
    def __init__(self, vae, dtype: torch.dtype | None = None):
        self.vae, self.dtype = vae, dtype or next(vae.parameters()).dtype
        cfg = vae.config
        self.channels = cfg.latent_channels
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale, self.shift = cfg.scaling_factor, cfg.shift_factor or 0.0

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, image: Tensor) -> Tensor:
        x = image.unsqueeze(0).to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        return ((z.float() - self.shift) * self.scale)[0].unsqueeze(1)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        z = latent.squeeze(1).unsqueeze(0).float() / self.scale + self.shift
        return self.vae.decode(z.to(self.device, self.dtype)).sample[0].float().clamp(-1, 1).cpu()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        return self.config_latent_shape(self.vae.config, height, width)

    @staticmethod
    def config_latent_shape(config, height: int, width: int) -> tuple[int, int, int, int]:
        """From the VAE's config (config.json's dict or diffusers' config): no weights needed."""
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
        return (config["latent_channels"], 1, height // factor, width // factor)
