"""Analytic (algorithmic) FLOP accounting: what the maths needs, not what a kernel happens to execute.

A multiply-add counts 2 FLOPs. Norms, activations, RoPE, embedders and modulation are left out (under 1% at
the real sizes), so the numbers match the tables in models.md. Used for MFU by the trainer and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.z_image import SEQ_MULTIPLE, ZImageConfig, round_up


@dataclass(frozen=True)
class Flops:
    dense: float        # weight GEMMs
    attention: float    # QK^T and PV

    @property
    def total(self) -> float:
        return self.dense + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.dense + other.dense, self.attention + other.attention)

    def __mul__(self, k: float) -> "Flops":
        return Flops(self.dense * k, self.attention * k)

    __rmul__ = __mul__


def _block(arch: ZImageConfig, tokens: int, seq_len: int) -> Flops:
    """One Z-Image block on ``tokens`` tokens that attend over sequences of ``seq_len`` tokens."""
    d, hidden = arch.dim, int(arch.dim / 3 * 8)
    dense = 2 * (4 * d * d + 3 * d * hidden) * tokens
    return Flops(dense=dense, attention=4 * seq_len * d * tokens)


def zimage_forward(arch: ZImageConfig, image_tokens: int, caption_tokens: int) -> Flops:
    """One sample's forward: noise refiner on the image, context refiner on the caption, main blocks on both.

    Token lists are padded to multiples of 32 as the model does (pads are real, attended tokens).
    """
    ni, lc = round_up(image_tokens, SEQ_MULTIPLE), round_up(caption_tokens, SEQ_MULTIPLE)
    refiners = arch.n_refiner_layers * (_block(arch, ni, ni) + _block(arch, lc, lc))
    return refiners + arch.n_layers * _block(arch, ni + lc, ni + lc)


def zimage_image_tokens(height: int, width: int, vae_factor: int = 8, patch: int = 2) -> int:
    return (height // vae_factor // patch) * (width // vae_factor // patch)
