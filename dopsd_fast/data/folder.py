"""A folder of images with captions: ``.txt`` sidecars, or ``metadata.jsonl`` with several caption variants.

``metadata.jsonl``: one JSON object per line with ``file_name`` (relative path) and ``caption``/``text`` as a
string, a list of variants, or a mapping (e.g. {"short": ..., "detailed": ..., "zh": ...}); one variant is
drawn per iteration. Without it, ``photo.png`` takes its caption from ``photo.txt`` (the whole file, one
variant). Every image is checked when the folder is scanned; bad input (corrupt or truncated file, CMYK / alpha /
16-bit modes, a tiny image, a missing, empty or non-UTF-8 caption, a duplicate file) is skipped with a warning
that names the file and counted in ``summary()``. A folder with nothing usable raises :class:`DataError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .buckets import make_buckets, nearest_bucket, resize_center_crop
from .synthetic import Pair

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_KEYS = ("caption", "captions", "text", "prompt")
# 8-bit RGB, greyscale and palette images convert to RGB losslessly; other modes would silently lose data.
SUPPORTED_MODES = {"RGB", "L", "P"}


class DataError(ValueError):
    """A data folder that cannot be trained on; the message names the folder and the fix."""


@dataclass
class Record:
    path: Path
    captions: list[str]
    height: int
    width: int
    bucket: int
    digest: str          # sha256 of the file bytes (cache key, duplicate detection)


class ImageFolder:
    def __init__(self, root: str | Path, side: int, buckets: int = 11, min_side: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.path: {self.root} is not a directory of images")
        self.buckets = make_buckets(side, buckets)
        self.min_side = min_side if min_side is not None else max(16, side // 4)
        self.skipped: dict[str, list[str]] = {}
        self.records = self._scan()
        if not self.records:
            reasons = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items()) or "no image files"
            raise DataError(f"data.path: {self.root} has no usable image-caption pairs ({reasons}); "
                            f"images need a caption (.txt sidecar or metadata.jsonl) and {sorted(IMAGE_SUFFIXES)}")

    # ------------------------------------------------------------------ scanning
    def _skip(self, path: Path, reason: str, detail: str = "") -> None:
        rel = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        self.skipped.setdefault(reason, []).append(rel)
        message = f"data: skipping {rel}: {reason}{': ' + detail if detail else ''}"
        log.warning(message)

    def _captions(self) -> dict[Path, list[str] | None]:
        """Image path -> caption variants (None: missing; [] empty; raises nothing)."""
        meta = self.root / "metadata.jsonl"
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not meta.is_file():
            return {p: self._sidecar(p) for p in images}
        found: dict[Path, list[str] | None] = {p: None for p in images}
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{meta}: not UTF-8 ({err}); re-save it as UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                path = self.root / entry["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{meta}:{n}: needs a JSON object with file_name and caption ({err})") from None
            found[path] = _variants(next((entry[k] for k in CAPTION_KEYS if k in entry), None))
        return found

    def _sidecar(self, image: Path) -> list[str] | None:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            return None
        try:
            return _variants(txt.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            return ["<non-utf8>"]          # flagged by the caller

    def _scan(self) -> list[Record]:
        records, seen = [], {}
        for path, captions in self._captions().items():
            if not path.is_file():
                self._skip(path, "missing image", "listed in metadata.jsonl")
                continue
            if captions == ["<non-utf8>"]:
                self._skip(path, "non-UTF-8 caption", f"re-save {path.with_suffix('.txt').name} as UTF-8")
                continue
            if captions is None:
                self._skip(path, "missing caption", "add a .txt sidecar or a metadata.jsonl entry")
                continue
            if not captions:
                self._skip(path, "empty caption")
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                self._skip(path, "duplicate", f"same bytes as {seen[digest].relative_to(self.root)}")
                continue
            size = self._check_image(path)
            if size is None:
                continue
            seen[digest] = path
            h, w = size
            records.append(Record(path, captions, h, w, nearest_bucket(h, w, self.buckets), digest))
        return records

    def _check_image(self, path: Path) -> tuple[int, int] | None:
        try:
            with Image.open(path) as img:
                mode, info = img.mode, img.info
                img.load()                       # decodes every byte: catches truncated files
                w, h = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            self._skip(path, "corrupt image", str(err))
            return None
        if mode not in SUPPORTED_MODES or (mode == "P" and "transparency" in info):
            what = ("alpha channel" if "A" in mode or mode == "P" else "more than 8 bits" if mode[0] in "IF"
                    else "CMYK colour" if mode == "CMYK" else "not RGB")
            self._skip(path, "unsupported mode", f"{mode} ({what}); convert it to 8-bit RGB")
            return None
        if min(h, w) < self.min_side:
            self._skip(path, "tiny image", f"{w}x{h}, shorter side below {self.min_side} px")
            return None
        return h, w

    # ------------------------------------------------------------------ dataset
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Pair:
        r = self.records[i]
        h, w = self.buckets[r.bucket]
        with Image.open(r.path) as img:
            return Pair(resize_center_crop(img, h, w), r.captions)

    def bucket_members(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(r.bucket, []).append(i)
        return out

    def summary(self) -> dict:
        sizes = Counter(f"{self.buckets[r.bucket][1]}x{self.buckets[r.bucket][0]}" for r in self.records)
        return {"usable": len(self.records), "skipped": sum(map(len, self.skipped.values())),
                "skipped_by_reason": {k: len(v) for k, v in self.skipped.items()},
                "skipped_files": {k: list(v) for k, v in self.skipped.items()}, "buckets": dict(sizes)}


def _variants(value) -> list[str] | None:
    """A caption string, list or mapping -> non-empty stripped variants; None when there is no caption."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, str):
        value = [value]
    return [v.strip() for v in value if isinstance(v, str) and v.strip()]
