"""Toy context encoders for the embedded CPU default (no language model on disk).

Student: c_s = f_text(prompt), a frozen hashed-word embedding table plus sinusoidal positions.
Teacher: c_t = f_mm(prompt, image), image patch tokens followed by the same text features; the text part
shares the student encoder's table, as the authors swap the text encoder's weights into the VLM.
Both return real tokens only (variable length), like Z-Image's Qwen3 features.
"""
from __future__ import annotations

import math
import re
import zlib

import torch
from torch import Tensor


def _positions(n: int, dim: int, offset: int = 0) -> Tensor:
    pos = torch.arange(offset, offset + n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(1e4) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class ToyTextEncoder:
    vocab = 4096

    def __init__(self, feat_dim: int, max_tokens: int, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(self.vocab, feat_dim, generator=g)
        self.feat_dim, self.max_tokens = feat_dim, max_tokens

    def token_ids(self, prompt: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", prompt.lower()) or ["<empty>"]
        return [zlib.crc32(w.encode()) % self.vocab for w in words][: self.max_tokens]

    def features(self, prompt: str, offset: int = 0) -> Tensor:
        ids = self.token_ids(prompt)
        return self.table[ids] + 0.5 * _positions(len(ids), self.feat_dim, offset)

    def __call__(self, prompts: list[str]) -> list[Tensor]:
        return [self.features(p) for p in prompts]


class ToyMultimodalEncoder:
    def __init__(self, text: ToyTextEncoder, image_size: int, grid: int = 4, image_first: bool = True, seed: int = 4321):
        g = torch.Generator().manual_seed(seed)
        self.text, self.grid, self.image_first = text, grid, image_first
        patch = image_size // grid
        self.proj = torch.randn(3 * patch * patch, text.feat_dim, generator=g) / math.sqrt(3 * patch * patch)

    def image_tokens(self, image: Tensor) -> Tensor:
        c, h, w = image.shape
        p = h // self.grid
        patches = image.reshape(c, self.grid, p, self.grid, p).permute(1, 3, 0, 2, 4).reshape(self.grid**2, -1)
        return patches @ self.proj

    def __call__(self, prompts: list[str], images: list[Tensor]) -> list[Tensor]:
        out = []
        for prompt, image in zip(prompts, images):
            img = self.image_tokens(image)
            n_img, n_txt = len(img), len(self.text.token_ids(prompt))
            # positions follow the message order, as a VLM's would
            img_at, txt_at = (0, n_img) if self.image_first else (n_txt, 0)
            img = img + 0.5 * _positions(n_img, self.text.feat_dim, img_at)
            txt = self.text.features(prompt, offset=txt_at)
            out.append(torch.cat([img, txt] if self.image_first else [txt, img]))
        return out
