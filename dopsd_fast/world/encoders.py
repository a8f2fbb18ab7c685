"""The world's context encoders: a tiny Qwen3 causal LM (transformers) and a multimodal encoder that puts image
patch embeddings into the same LM's input sequence, so the language weights are shared (the authors swap the
text encoder's weights into the VLM's language model).

Student context c_s = LM([<bos>, words]); teacher context c_t = LM([<bos>, image patches, words]) (image
first, as the authors' message). Both return the real rows of the last hidden state, one (L, dim) tensor per
prompt, like Z-Image's Qwen3 features with padding removed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .scene import BACKGROUNDS, COLOURS, CONCEPT_WORD, NONCE_WORDS, POSITIONS, SHAPES, SIZE, SIZES

SPECIALS = ("<pad>", "<bos>", "<image>")
GRAMMAR = ("a", "at", "in", "the", "on", "background", "with")
VOCAB = SPECIALS + GRAMMAR + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS) + tuple(POSITIONS) + tuple(SIZES) \
    + NONCE_WORDS + (CONCEPT_WORD,)
ENCODER_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64}
IMAGE_PATCH = 4


def token_ids(prompt: str) -> list[int]:
    ids = [VOCAB.index("<bos>")]
    for word in prompt.split():
        if word not in VOCAB:
            raise ValueError(f"word {word!r} is not in the world's vocabulary (dopsd_fast/world/encoders.py VOCAB)")
        ids.append(VOCAB.index(word))
    return ids


class WorldEncoders(nn.Module):
    """The tiny LM plus the patch embedder of the multimodal path. The word table stays at its random init."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import Qwen3Config, Qwen3Model   # optional dependency, needed only by the world
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=None, eos_token_id=None, **ENCODER_CONFIG)
        self.language = Qwen3Model(cfg)
        self.language.embed_tokens.weight.requires_grad_(False)
        d, p = cfg.hidden_size, IMAGE_PATCH
        n = (SIZE // p) ** 2
        self.vision = nn.Sequential(nn.Linear(3 * p * p, d), nn.GELU(), nn.Linear(d, d))
        self.vision_pos = nn.Parameter(torch.randn(n, d) * 0.02)
        self.dim = d

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, n_patches, dim), patches row-major."""
        b, c, s, _ = images.shape
        p = IMAGE_PATCH
        patches = images.reshape(b, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (s // p) ** 2, -1)
        return self.vision(patches) + self.vision_pos

    def forward(self, prompts: list[str], images: list[Tensor] | None = None) -> list[Tensor]:
        """Per prompt: (L_i, dim) features; with images, the image rows come right after <bos>."""
        table = self.language.embed_tokens
        rows = []
        for i, prompt in enumerate(prompts):
            ids = torch.tensor(token_ids(prompt))
            emb = table(ids)
            if images is not None and images[i] is not None:
                img = self.image_embeds(images[i][None].to(emb.dtype))[0]
                emb = torch.cat([emb[:1], img, emb[1:]])
            rows.append(emb)
        lengths = [len(r) for r in rows]
        width = max(lengths)
        embeds = torch.zeros(len(rows), width, self.dim, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):         # right padding: causal rows before the pads are unaffected
            embeds[i, : len(r)] = r
            mask[i, : len(r)] = 1
        hidden = self.language(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return [hidden[i, :n] for i, n in enumerate(lengths)]


class TextContext:
    """c_s = f_text(prompt): the frozen LM on the words only."""

    def __init__(self, encoders: WorldEncoders):
        self.encoders = encoders

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[Tensor]:
        return self.encoders(prompts)


class MultimodalContext:
    """c_t = f_mm(prompt, image): the same frozen LM with the image's patch embeddings first."""

    def __init__(self, encoders: WorldEncoders):
        self.encoders = encoders

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[Tensor]) -> list[Tensor]:
        return self.encoders(prompts, images)
