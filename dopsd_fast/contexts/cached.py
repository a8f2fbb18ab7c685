"""Student / teacher contexts and VAE latents through the on-disk caches (``data/feature_cache.py``).

``CachedContexts.student(prompts)`` and ``.teacher(prompts, images)`` have the toy encoders' signatures, so the
trainer calls them the same way. Only misses reach the encoders. When the teacher reuses the student's
prompt-prefix KV (``teacher_vlm.py``), the student pass of the same batch is kept for the teacher call.

**Encoders loaded on first use.** An encoder may be given as a :class:`Lazy`: its identity (the cache folder) is
known from its files, and it is loaded the first time an entry misses, so a run on a warm cache (``dopsd cache``)
never loads one. With ``encode_missing=False`` a miss is a :class:`CacheMiss` naming the entry's file instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from ..data.feature_cache import FeatureCache, image_key, pair_key, text_key
from ..data.folder import DataError
from .qwen_text import QwenTextEncoder, StudentPass
from .teacher_vlm import QwenVLTeacher


class CacheMiss(DataError):
    """An encoder output a run without its encoders needs and the cache lacks; the message names the file."""


class Lazy:
    """An encoder known by its identity (its cache folder's name, computed from its files) and loaded by
    ``get()`` the first time it has to run; ``Lazy.of(encoder)`` wraps one already loaded."""

    def __init__(self, load: Callable[[], Any], identity: str, what: str):
        self._load, self.identity, self.what, self.value = load, identity, what, None

    @classmethod
    def of(cls, encoder) -> "Lazy":
        lazy = cls(lambda: encoder, getattr(encoder, "identity", ""), type(encoder).__name__)
        lazy.value = encoder
        return lazy

    @property
    def loaded(self) -> bool:
        return self.value is not None

    def get(self):
        if self.value is None:
            value = self._load()
            found = getattr(value, "identity", self.identity)
            if found != self.identity:      # the cache folder was named for other weights: never mix entries
                raise RuntimeError(f"{self.what}: loaded as {found}, expected {self.identity} from its files")
            self.value = value
        return self.value


def _lazy(encoder) -> Lazy | None:
    return encoder if encoder is None or isinstance(encoder, Lazy) else Lazy.of(encoder)


def missing_entry(cache: FeatureCache, key: str, what: str) -> CacheMiss:
    return CacheMiss(f"{cache.path(key)}: not in the cache ({what}), and data.encode_missing is false, so no "
                     "encoder is loaded to compute it; run `dopsd cache CONFIG` with this run's config (same --set "
                     "overrides) first, or set data.encode_missing=true to encode misses during training")


class CachedContexts:
    def __init__(self, text: QwenTextEncoder | Lazy, teacher: QwenVLTeacher | Lazy | None,
                 cache_root: str | Path | None, encode_missing: bool = True):
        """``encode_missing=False`` (with a cache): a miss raises :class:`CacheMiss` and no encoder is loaded."""
        self._text, self._teacher = _lazy(text), _lazy(teacher)
        self.encode_missing = encode_missing or not cache_root
        self.text_cache = FeatureCache(cache_root, "student_text", self._text.identity) if cache_root else None
        self.teacher_cache = (FeatureCache(cache_root, "teacher_mm", self._teacher.identity)
                              if cache_root and teacher is not None else None)
        self._last_pass: tuple[list[str], StudentPass] | None = None

    @property
    def text(self) -> QwenTextEncoder:
        return self._text.get()

    @property
    def teacher_encoder(self) -> QwenVLTeacher | None:
        return None if self._teacher is None else self._teacher.get()

    def loaded(self) -> list[str]:
        """Which encoders have been loaded so far (a run on a warm cache: none)."""
        return [name for name, e in (("text", self._text), ("teacher", self._teacher)) if e is not None and e.loaded]

    def student(self, prompts: list[str]) -> list[Tensor]:
        found = {i: self.text_cache.get(text_key(p)) for i, p in enumerate(prompts)} if self.text_cache else {}
        missing = [i for i in range(len(prompts)) if found.get(i) is None]
        if missing:
            if not self.encode_missing:
                raise missing_entry(self.text_cache, text_key(prompts[missing[0]]),
                                    f"student text features of {prompts[missing[0]]!r}")
            # keep the pass for a teacher already loaded that reuses the prompt prefix (not worth loading one)
            keep = self._teacher is not None and self._teacher.loaded and self._teacher.value.reuses_prefix
            run = self.text.encode([prompts[i] for i in missing], keep_cache=keep)
            self._last_pass = ([prompts[i] for i in missing], run) if keep else None
            for i, f in zip(missing, run.features):
                found[i] = f
                if self.text_cache:
                    self.text_cache.put(text_key(prompts[i]), f)
        return [found[i] for i in range(len(prompts))]

    def teacher(self, prompts: list[str], images: list[Tensor]) -> list[Tensor]:
        if self._teacher is None:
            raise RuntimeError("no teacher encoder: set context.teacher_model to a Qwen3-VL folder")
        keys = [pair_key(p, im) for p, im in zip(prompts, images)]
        found = {i: self.teacher_cache.get(k) for i, k in enumerate(keys)} if self.teacher_cache else {}
        missing = [i for i in range(len(prompts)) if found.get(i) is None]
        last, self._last_pass = self._last_pass, None
        if missing and not self.encode_missing:
            raise missing_entry(self.teacher_cache, keys[missing[0]],
                                f"teacher features of {prompts[missing[0]]!r} with its image")
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
    """A latent codec whose ``encode`` goes through the cache (the SFT baseline's targets, validation).

    ``codec`` may be a :class:`Lazy` (loaded at the first miss); then ``latent_shape`` (a function of the image
    size) and ``channels`` are given, so that shapes never load it. ``decode`` (sample grids) loads
    ``decoder`` if given (a second Lazy: the VAE on the CPU for a run that keeps the encoders off the device),
    else the codec. ``encode_missing=False``: a miss raises :class:`CacheMiss`.
    """

    def __init__(self, codec, cache: FeatureCache | None, latent_shape: Callable | None = None,
                 channels: int | None = None, decoder: Lazy | None = None, encode_missing: bool = True):
        self._codec, self.cache, self._decoder = _lazy(codec), cache, decoder
        self._shape = latent_shape
        self.channels = channels if channels is not None else self.codec.channels
        self.encode_missing = encode_missing or cache is None

    @property
    def codec(self):
        return self._codec.get()

    def loaded(self) -> list[str]:
        return [n for n, e in (("vae", self._codec), ("vae_decoder", self._decoder)) if e is not None and e.loaded]

    def encode(self, image: Tensor) -> Tensor:
        key = image_key(image)
        z = self.cache.get(key) if self.cache else None
        if z is None:
            if not self.encode_missing:
                raise missing_entry(self.cache, key, f"VAE latents of a {tuple(image.shape)} image")
            z = self.codec.encode(image)
            if self.cache:
                self.cache.put(key, z)
        return z

    def decode(self, latent: Tensor) -> Tensor:
        return (self._decoder.get() if self._decoder is not None else self.codec).decode(latent)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self._shape(height, width) if self._shape is not None else self.codec.latent_shape(height, width)
