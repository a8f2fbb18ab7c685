"""Few-step Euler sampling with the student, and PNG grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .method.schedule import FlowConvention


@torch.no_grad()
def sample(model, flow: FlowConvention, cap_feats: list[Tensor], latent_shape: tuple[int, ...], sigmas: list[float],
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Run ``len(sigmas) - 1`` Euler steps from N(0, I); returns one clean latent per caption."""
    ctx = model.encode_context(cap_feats)
    device = next(model.parameters()).device    # noise from the host generator: the same samples on any device
    x = [torch.randn(latent_shape, generator=generator).to(device, dtype) for _ in cap_feats]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = flow.time(torch.full((len(x),), sigma, device=device))
        out = model(x, t, context=ctx)
        x = [flow.euler(xi, oi, sigma, sigma_next) for xi, oi in zip(x, out)]
    return x


def decoded_samples(model, flow: FlowConvention, cap_feats: list[Tensor], codec, size: int, sigmas: list[float],
                    seed: int, dtype: torch.dtype, backend: str) -> list[Tensor]:
    """(3, size, size) images in [-1, 1], one per context: sample ``i`` starts from the i-th noise draw of a generator
    seeded with ``seed``; ``codec`` gives the latent shape and decodes; the ops run on ``backend``."""
    from .ops._dispatch import use_backend

    g = torch.Generator().manual_seed(seed)
    with use_backend(backend):
        latents = sample(model, flow, cap_feats, codec.latent_shape(size, size), sigmas, g, dtype)
    return [codec.decode(x.float()) for x in latents]


def square_crop(image: Tensor, size: int) -> Tensor:
    """Centre square of a (3, H, W) image (a bucketed, maybe non-square target) at ``size`` x ``size``."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    s = min(h, w)
    crop = image[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return torch.nn.functional.interpolate(crop[None], size=(size, size), mode="area")[0]


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_grid(rows: list[list[Tensor | None]], path: Path, upscale: int = 4, pad: int = 2,
              row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> Path:
    """Save a grid of (3, H, W) images in [-1, 1] (all the same size) as a PNG; a None tile stays blank.

    ``row_labels`` are written in a left margin (cut to two tile widths: prompts can be long), ``col_labels`` in a
    strip above the columns (cut to the tile width); without labels the PNG is exactly the tiles, each upscaled and
    padded by ``pad`` pixels.
    """
    h, w = next(img for row in rows for img in row if img is not None).shape[-2:]
    th, tw = h * upscale, w * upscale
    cols = max(len(r) for r in rows)
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3]
    row_labels = [_fit(s, font, 2 * tw) for s in row_labels] if row_labels else None
    left = math.ceil(max(font.getlength(s) for s in row_labels)) + 3 * pad if row_labels else 0
    top = line + pad if col_labels else 0
    canvas = np.full((top + len(rows) * (th + pad) + pad, left + cols * (tw + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img is None:
                continue
            y, x = top + pad + i * (th + pad), left + pad + j * (tw + pad)
            canvas[y:y + th, x:x + tw] = to_uint8(img).repeat(upscale, 0).repeat(upscale, 1)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(row_labels or []):
        draw.text((pad, top + pad + i * (th + pad) + (th - line) // 2), label, fill=(0, 0, 0), font=font)
    for j, label in enumerate(col_labels or []):
        draw.text((left + pad + j * (tw + pad), pad // 2), _fit(label, font, tw), fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _fit(text: str, font, width: int) -> str:
    """``text``, cut and ended with '...' where it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
