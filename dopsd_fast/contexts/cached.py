"""Student / teacher contexts and VAE latents through the on-disk caches (``data/feature_cache.py``).

``CachedContexts.student(prompts)`` and ``.teacher(prompts, images)`` have the toy encoders' signatures, so the
trainer calls them the same way. Only misses reach the encoders. When the teacher reuses the student's
prompt-prefix KV (``teacher_vlm.py``), the student pass of the same batch is kept for the teacher call.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..data.feature_cache import FeatureCache, image_key, pair_key, text_key
from .qwen_text import QwenTextEncoder, StudentPass
from .teacher_vlm import QwenVLTeacher


class CachedContexts:
    def __init__(self, text: QwenTextEncoder, teacher: QwenVLTeacher | None, cache_root: str | Path | None):
        self.text, self.teacher_encoder = text, teacher
        self.text_cache = FeatureCache(cache_root, "student_text", text.identity) if cache_root else None
        self.teacher_cache = (FeatureCache(cache_root, "teacher_mm", teacher.identity)
                              if cache_root and teacher is not None else None)
        self._last_pass: tuple[list[str], StudentPass] | None = None

    def student(self, prompts: list[str]) -> list[Tensor]:
        keep = self.teacher_encoder is not None and self.teacher_encoder.reuses_prefix
        found = {i: self.text_cache.get(text_key(p)) for i, p in enumerate(prompts)} if self.text_cache else {}
        missing = [i for i in range(len(prompts)) if found.get(i) is None]
        if missing:
            run = self.text.encode([prompts[i] for i in missing], keep_cache=keep)
            self._last_pass = ([prompts[i] for i in missing], run) if keep else None
            for i, f in zip(missing, run.features):
                found[i] = f
                if self.text_cache:
                    self.text_cache.put(text_key(prompts[i]), f)
        return [found[i] for i in range(len(prompts))]

    def teacher(self, prompts: list[str], images: list[Tensor]) -> list[Tensor]:
        if self.teacher_encoder is None:
            raise RuntimeError("no teacher encoder: set context.teacher_model to a Qwen3-VL folder")
        keys = [pair_key(p, im) for p, im in zip(prompts, images)]
        found = {i: self.teacher_cache.get(k) for i, k in enumerate(keys)} if self.teacher_cache else {}
        missing = [i for i in range(len(prompts)) if found.get(i) is None]
        last, self._last_pass = self._last_pass, None
        for i in missing:
            student = None
            if last is not None and prompts[i] in last[0]:
                b = last[0].index(prompts[i])
                student = StudentPass(last[1].ids[b:b + 1], last[1].features[b:b + 1], _batch_slice(last[1].cache, b))
            found[i] = self.teacher_encoder([prompts[i]], [images[i]], student)[0]
            if self.teacher_cache:
                self.teacher_cache.put(keys[i], found[i])
        return [found[i] for i in range(len(prompts))]

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: {"hits": c.hits, "misses": c.misses}
                for name, c in (("student_text", self.text_cache), ("teacher_mm", self.teacher_cache)) if c}


def _batch_slice(cache, b: int):
    """One sample's KV from a batched cache, as (keys, values) per layer."""
    from .teacher_vlm import cache_layers
    return [(k[b:b + 1], v[b:b + 1]) for k, v in cache_layers(cache)]


class CachedLatents:
    """A latent codec whose ``encode`` goes through the cache (the SFT baseline's targets, validation)."""

    def __init__(self, codec, cache: FeatureCache | None):
        self.codec, self.cache = codec, cache
        self.channels = codec.channels

    def encode(self, image: Tensor) -> Tensor:
        key = image_key(image)
        z = self.cache.get(key) if self.cache else None
        if z is None:
            z = self.codec.encode(image)
            if self.cache:
                self.cache.put(key, z)
        return z

    def decode(self, latent: Tensor) -> Tensor:
        return self.codec.decode(latent)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.codec.latent_shape(height, width)
