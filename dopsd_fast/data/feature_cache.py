"""On-disk caches of encoder outputs: student text features, teacher multimodal features, VAE latents.

One safetensors file per entry at ``<root>/<kind>/<encoder identity>/<key[:2]>/<key>.safetensors``. The key hashes
the inputs (caption text; the exact image crop's bytes), the identity names the encoder (weights, dtype, spec),
so an edited image or caption, or a changed encoder, misses and is recomputed, while unchanged entries are reused
across runs. Writes are atomic (temporary file + rename); an unreadable entry counts as a miss and is rewritten.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dopsd_fast"


def folder_fingerprint(folder: str | Path) -> str:
    """Names, sizes and mtimes of a weights folder's files: cheap for multi-GB shards, changes when any file does."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file())
    return hashlib.sha256("|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode()).hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha256(b"text\0" + text.encode("utf-8")).hexdigest()


def image_key(image: Tensor) -> str:
    """Hash of the exact crop the encoder sees (float32 bytes + shape): a new crop size is a new entry."""
    x = image.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()


def pair_key(text: str, image: Tensor) -> str:
    return hashlib.sha256((text_key(text) + image_key(image)).encode()).hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path, kind: str, identity: str):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)
        self.dir = Path(root) / kind / safe
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Tensor | None:
        path = self.path(key)
        if path.is_file():
            try:
                value = load_file(str(path))["value"]
                self.hits += 1
                return value
            except (SafetensorError, OSError, KeyError):
                path.unlink(missing_ok=True)       # torn or foreign file: recompute it
        self.misses += 1
        return None

    def put(self, key: str, value: Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"value": value.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()
