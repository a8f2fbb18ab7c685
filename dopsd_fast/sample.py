"""Few-step Euler sampling with the student, and PNG grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .method.schedule import FlowConvention


@torch.no_grad()
def sample(model, flow: FlowConvention, cap_feats: list[Tensor], latent_shape: tuple[int, ...], sigmas: list[float],
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Run ``len(sigmas) - 1`` Euler steps from N(0, I); returns one clean latent per caption."""
    ctx = model.encode_context(cap_feats)
    device = cap_feats[0].device     # noise from the host generator: the same samples on any device
    x = [torch.randn(latent_shape, generator=generator).to(device, dtype) for _ in cap_feats]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = flow.time(torch.full((len(x),), sigma, device=device))
        out = model(x, t, context=ctx)
        x = [flow.euler(xi, oi, sigma, sigma_next) for xi, oi in zip(x, out)]
    return x


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_grid(rows: list[list[Tensor]], path: Path, upscale: int = 4, pad: int = 2) -> Path:
    """Save a grid of (3, H, W) images in [-1, 1] (all the same size) as a PNG."""
    h, w = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h * upscale + pad) + pad, cols * (w * upscale + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = to_uint8(img).repeat(upscale, 0).repeat(upscale, 1)
            y, x = pad + i * (h * upscale + pad), pad + j * (w * upscale + pad)
            canvas[y:y + h * upscale, x:x + w * upscale] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
