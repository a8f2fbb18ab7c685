"""Latent codec over diffusers' AutoencoderKLFlux2: image (3, H, W) in [-1, 1] <-> klein latent (4C, H/16, W/16).

models.md 3.6 (= Flux2KleinPipeline._encode_vae_image): posterior mode, 2x2 patchify to 4C channels, then the
VAE's BatchNorm statistics: z = (z - running_mean) / sqrt(running_var + batch_norm_eps). Decode inverts it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .latents import patchify, unpatchify


class Flux2VaeLatents:
    def __init__(self, vae, dtype: torch.dtype | None = None):
        self.vae, self.dtype = vae, dtype or next(vae.parameters()).dtype
        cfg = vae.config
        self.channels = 4 * cfg.latent_channels
        self.factor = 2 ** (len(cfg.block_out_channels) - 1) * 2
        self.mean = vae.bn.running_mean.float().view(-1, 1, 1)
        self.std = torch.sqrt(vae.bn.running_var.float() + cfg.batch_norm_eps).view(-1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, image: Tensor) -> Tensor:
        z = self.vae.encode(image.unsqueeze(0).to(self.device, self.dtype)).latent_dist.mode()[0].float()
        return (patchify(z, 2) - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        z = unpatchify(latent.float() * self.std.to(latent.device) + self.mean.to(latent.device), 2)
        return self.vae.decode(z.unsqueeze(0).to(self.device, self.dtype)).sample[0].float().clamp(-1, 1).cpu()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.config_latent_shape(self.vae.config, height, width)

    @staticmethod
    def config_latent_shape(config, height: int, width: int) -> tuple[int, int, int]:
        """From the VAE's config (config.json's dict or diffusers' config): no weights needed."""
        factor = 2 ** (len(config["block_out_channels"]) - 1) * 2
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
        return (4 * config["latent_channels"], height // factor, width // factor)
