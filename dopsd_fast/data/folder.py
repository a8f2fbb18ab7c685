"""A folder of images with captions: ``.txt`` sidecars, or ``metadata.jsonl`` with several caption variants.

``metadata.jsonl``: one JSON object per line with ``file_name`` (relative path) and ``caption``/``text`` as a
string (a number is read as its text), a list of variants, or a mapping (e.g. {"short": ..., "detailed": ...,
"zh": ...}); one variant is drawn per iteration. Without it, ``photo.png`` takes its caption from ``photo.txt``
(the whole file, one variant).

Every entry is checked when the folder is scanned. Bad input is skipped with a warning that names the file (or
``metadata.jsonl:LINE``) and counted by reason in ``summary()`` (the run's ``data_summary.json``): a corrupt or
truncated file, CMYK or alpha (or another unsupported mode), a tiny image, a missing, empty, invalid or non-UTF-8
caption, a duplicate file, a malformed ``metadata.jsonl`` line (only that line is skipped), a symlink loop, a
broken symlink, or an entry that is not a regular file (a FIFO, socket or device). A folder with nothing usable
raises :class:`DataError`.

8-bit RGB, greyscale and palette images are used as RGB. 16-bit PNGs (RGB or greyscale) are read at full depth and
scaled as sample / 65535 (``read_deep_png``): Pillow alone keeps the top byte of 16-bit RGB (floor(v / 256), up to
one 8-bit level low) and clips 16-bit greyscale at 255, white.

An image whose centre crop to its bucket keeps less than ``MIN_CROP_KEEP`` of its area is used, but warned about
and counted under ``warned_by_reason`` ("extreme aspect ratio"): its caption likely describes what the crop cuts
away. With the default 11 buckets (aspect ratios up to 2.33) that is an image wider or taller than 4.67:1; with
``data.buckets=1`` (square crops only), beyond 2:1.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..progress import progress as progress_bar
from .buckets import cover_size, make_buckets, nearest_bucket, resize_center_crop
from .synthetic import Pair

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_KEYS = ("caption", "captions", "text", "prompt")
# 8-bit RGB, greyscale and palette images convert to RGB losslessly; other modes would silently lose data
# (16-bit PNGs open as RGB or I;16 and are read by read_deep_png instead).
SUPPORTED_MODES = {"RGB", "L", "P"}
# Pillow's rawmodes of 16-bit PNG samples: RGB ones unpack to their high bytes (mode RGB), greyscale ones to mode
# I;16 (I in older Pillow).
DEEP_PNG_RAWMODES = {"RGB;16B", "I;16B"}
# The share of an image's area its centre crop must keep before it is warned about: below half, most of what
# the caption describes may be cut away (a 5:1 panorama in a 2.33:1 bucket keeps 47%).
MIN_CROP_KEEP = 0.5
# Bump when a Record's fields or the checks change: index files of older scans then no longer match and rebuild.
INDEX_VERSION = 1


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
    span: list | None = None    # inside a tar shard: [shard relative to the root, byte offset, size]; else None


class ImageFolder:
    """``index_dir``: where the scan's result is kept (``index_file``), keyed by the folder's listing; a later
    ImageFolder on an unchanged folder reads it instead of hashing and decoding every image. ``index``: a scan's
    result (``self.index``, e.g. rank 0's), used as it is, without reading the folder."""

    kind = "folder"     # its data.kind

    def __init__(self, root: str | Path, side: int, buckets: int = 11, min_side: int | None = None,
                 index_dir: str | Path | None = None, progress: bool = False, index: dict | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.path: {self.root} is not a directory of images")
        self.buckets = make_buckets(side, buckets)
        self.min_side = min_side if min_side is not None else max(16, side // 4)
        self.skipped: dict[str, list[str]] = {}
        self.warned: dict[str, list[str]] = {}      # used, but flagged (extreme aspect ratio)
        self.caption_problems: dict[Path, tuple[str, str]] = {}     # image -> (reason, detail) of its bad caption
        self.index_hit = False
        self.index = index if index is not None else self._indexed(index_dir, progress)
        self.records = [Record(self.root / rel, *rest) for rel, *rest in self.index["records"]]
        self.skipped, self.warned = self.index["skipped"], self.index["warned"]
        if not self.records:
            reasons = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items()) or "no image files"
            raise DataError(f"data.path: {self.root} has no usable image-caption pairs ({reasons}); "
                            f"images need a caption (.txt sidecar or metadata.jsonl) and {sorted(IMAGE_SUFFIXES)}")

    # ------------------------------------------------------------------ the index
    def _listing(self) -> str:
        """A hash of every entry's relative path, size, mtime and type: adding, removing, editing or touching an
        image, a sidecar or metadata.jsonl changes it (a stat per entry; nothing is read)."""
        h = hashlib.sha256()
        for path in sorted(self.root.rglob("*")):
            try:
                st = path.stat()
                h.update(f"{path.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{stat.S_IFMT(st.st_mode)}\n"
                         .encode("utf-8", "surrogateescape"))
            except OSError as err:          # broken links and loops are listed by their error
                h.update(f"{path.relative_to(self.root)}\0{err.errno}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def index_file(self, index_dir: str | Path) -> Path:
        """This folder's index under ``index_dir``: one file per folder and scan setting (buckets, min_side)."""
        key = json.dumps([INDEX_VERSION, type(self).__name__, str(self.root.resolve()), self.buckets, self.min_side])
        return Path(index_dir) / f"{self.kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def _indexed(self, index_dir: str | Path | None, progress: bool) -> dict:
        """The saved index when the folder's listing still matches it (``index_hit``), else a new scan, saved."""
        if index_dir is None:
            return self._scan(progress)
        path, listing = self.index_file(index_dir), self._listing()
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["listing"] == listing:
                self.index_hit = True
                if saved["skipped"]:
                    counts = {k: len(v) for k, v in saved["skipped"].items()}
                    log.warning(f"data: skipping {sum(counts.values())} files as the index {path} recorded {counts}; "
                                "their names are in the run's data_summary.json")
                return saved
        except (OSError, ValueError, KeyError, TypeError):
            pass                        # no index yet, or a torn or foreign file: scan and replace it
        index = {**self._scan(progress), "listing": listing}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return index

    # ------------------------------------------------------------------ scanning
    def _skip(self, path: Path | str, reason: str, detail: str = "", counts: dict | None = None,
              verb: str = "skipping") -> None:
        """Count ``path`` (or a ``metadata.jsonl:LINE``) under ``reason`` and warn naming it."""
        rel = path if isinstance(path, str) else self._rel(path)
        (self.skipped if counts is None else counts).setdefault(reason, []).append(rel)
        log.warning(f"data: {verb} {rel}: {reason}{': ' + detail if detail else ''}")

    def _rel(self, path: Path) -> str:
        """``path`` relative to the folder; one outside it (a metadata.jsonl entry may point there) as it is."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _images(self) -> list[Path]:
        """Every non-hidden entry with an image suffix that is not a directory: regular files, and the FIFOs, broken
        or looping links ``_scan`` reports (never silently dropped). Symlinked folders are not descended into."""
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                      and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def _captions(self) -> dict[Path, list[str] | None]:
        """Image path -> caption variants (None: missing; [] empty); bad captions go to ``caption_problems`` and
        malformed metadata lines are skipped and counted. Raises nothing."""
        meta = self.root / "metadata.jsonl"
        images = self._images()
        if not meta.is_file():
            return {p: self._sidecar(p) for p in images}
        found: dict[Path, list[str] | None] = {p: None for p in images}
        for n, raw in enumerate(meta.read_bytes().splitlines(), 1):
            where = f"metadata.jsonl:{n}"
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                name = entry["file_name"]
                if not isinstance(name, str) or not name.strip():
                    raise TypeError(f"file_name is {json.dumps(name)}, not a relative path")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                what = "no file_name" if isinstance(err, KeyError) else " ".join(str(err).split())
                self._skip(where, "malformed metadata line", f"needs a UTF-8 JSON object with file_name and caption "
                           f"({what}); fix the line, it is skipped")
                continue
            path, value = self.root / name, next((entry[k] for k in CAPTION_KEYS if k in entry), None)
            try:
                found[path] = _variants(value)
            except TypeError as err:
                found[path] = None
                self.caption_problems[path] = ("invalid caption", f"{where}: {err}; write it as text, a list or a "
                                               "mapping of texts")
        return found

    def _sidecar(self, image: Path) -> list[str] | None:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            return None
        try:
            return _variants(txt.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            self.caption_problems[image] = ("non-UTF-8 caption", f"re-save {txt.name} as UTF-8")
            return None

    def _scan(self, progress: bool = False) -> dict:
        """Every entry checked, the images decoded once: {"records": [[relative path, captions, height, width,
        bucket, digest, span]], "skipped": {reason: [names]}, "warned": {reason: [names]}} (Record's fields)."""
        records, seen = [], {}
        entries = self._captions()
        for path, captions in progress_bar(entries.items(), total=len(entries), desc=f"data: scanning {self.root}",
                                           unit="image", enabled=progress):
            problem = self._entry_problem(path)
            if problem is not None:
                self._skip(path, *problem)
                continue
            if path in self.caption_problems:
                self._skip(path, *self.caption_problems[path])
                continue
            if captions is None:
                self._skip(path, "missing caption", "add a .txt sidecar or a metadata.jsonl entry")
                continue
            if not captions:
                self._skip(path, "empty caption")
                continue
            try:
                data = self._read(path)
            except OSError as err:
                self._skip(path, "unreadable file", f"{err.strerror}; fix its permissions")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                self._skip(path, "duplicate", f"same bytes as {self._rel(seen[digest])}")
                continue
            size = self._check_image(path, data)
            if size is None:
                continue
            seen[digest] = path
            h, w = size
            bucket = nearest_bucket(h, w, self.buckets)
            bh, bw = self.buckets[bucket]
            kept = bh * bw / math.prod(cover_size(h, w, bh, bw))
            if kept < MIN_CROP_KEEP:
                self._skip(path, "extreme aspect ratio", f"{w}x{h}: its centre crop to the {bw}x{bh} bucket keeps "
                           f"{kept:.0%} of it (below {MIN_CROP_KEEP:.0%}); crop it to what the caption describes",
                           counts=self.warned, verb="using")
            records.append([self._rel(path), captions, h, w, bucket, digest, self._span(path)])
        return {"records": records, "skipped": self.skipped, "warned": self.warned}

    # How an entry is read: a file of the folder here; TarShards (shards.py) reads members of tar files instead.
    def _entry_problem(self, path: Path) -> tuple[str, str] | None:
        return _not_regular(path)

    def _read(self, path: Path) -> bytes:
        return path.read_bytes()

    def _span(self, path: Path) -> list | None:
        return None

    def _check_image(self, path: Path, data: bytes) -> tuple[int, int] | None:
        """(height, width) of the image ``path`` whose bytes are ``data``, or None when it is skipped."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                mode, info, deep = img.mode, img.info, _deep_rawmode(img)
                img.load()                       # decodes every byte: catches truncated files
                w, h = img.size
            if deep:
                read_deep_png(data)              # the low bytes too
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            # Pillow names the in-memory buffer, not the file, in its "cannot identify image file" message
            self._skip(path, "corrupt image", "not an image file Pillow can read" if isinstance(
                err, UnidentifiedImageError) else str(err))
            return None
        if "transparency" in info or (mode not in SUPPORTED_MODES and not deep):
            what = ("alpha channel" if "A" in mode or "transparency" in info else "more than 8 bits" if mode[0] in "IF"
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
        return Pair(self.image(i), self.captions(i))

    def captions(self, i: int) -> list[str]:
        return self.records[i].captions

    def image(self, i: int) -> Tensor:
        """Record i decoded, resized and centre-cropped to its bucket: (3, h, w) in [-1, 1]."""
        r = self.records[i]
        h, w = self.buckets[r.bucket]
        source = r.path if r.span is None else io.BytesIO(read_span(self.root / r.span[0], *r.span[1:]))
        with Image.open(source) as img:
            if _deep_rawmode(img) is None:
                return resize_center_crop(img, h, w)
        return resize_center_crop(read_deep_png(source), h, w)

    def bucket_members(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(r.bucket, []).append(i)
        return out

    def summary(self) -> dict:
        sizes = Counter(f"{self.buckets[r.bucket][1]}x{self.buckets[r.bucket][0]}" for r in self.records)
        return {"usable": len(self.records), "skipped": sum(map(len, self.skipped.values())),
                "skipped_by_reason": {k: len(v) for k, v in self.skipped.items()},
                "skipped_files": {k: list(v) for k, v in self.skipped.items()},
                "warned": sum(map(len, self.warned.values())),
                "warned_by_reason": {k: len(v) for k, v in self.warned.items()},
                "warned_files": {k: list(v) for k, v in self.warned.items()}, "buckets": dict(sizes)}


def _text(value) -> str | None:
    """A caption variant as text: a string, or a number as JSON wrote it (``2024``); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _variants(value) -> list[str] | None:
    """A caption (string or number), list or mapping of them -> non-empty stripped variants; None when there is no
    caption. Inside a list or mapping, entries that are not text (null, nested lists) are dropped; a caption that is
    none of these (``true``) raises TypeError."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        if _text(value) is None:
            raise TypeError(f"caption {json.dumps(value)} is not text")
        value = [value]
    texts = (_text(v) for v in value)
    return [t.strip() for t in texts if t is not None and t.strip()]


def _not_regular(path: Path) -> tuple[str, str] | None:
    """Why ``path`` is no regular file to read, as (reason, detail), or None when it is one."""
    try:
        mode = path.stat().st_mode          # follows links
    except OSError as err:
        try:
            target = os.readlink(path)
        except OSError:
            return "missing image", "listed in metadata.jsonl"
        if err.errno == errno.ELOOP:
            return "symlink loop", f"links to {target}, which never reaches a file; replace the link by the image"
        return "broken symlink", f"links to {target}, which does not exist"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device")
    return "not a regular file", f"{kind}; only image files are read"


def _deep_rawmode(img: Image.Image) -> str | None:
    """The 16-bit sample layout of an opened (not yet loaded) PNG, or None for 8-bit and non-PNG images."""
    if img.format != "PNG" or len(img.tile) != 1:
        return None
    args = img.tile[0][3]
    raw = args[0] if isinstance(args, tuple) else args
    return raw if raw in DEEP_PNG_RAWMODES else None


def read_span(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from ``offset`` (a tar member's data); OSError when the file ends before."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise OSError(errno.EIO, f"{path} ends {size - len(data)} bytes into a member (a truncated shard)")
    return data


def read_deep_png(source: Path | bytes | io.BytesIO) -> np.ndarray:
    """A 16-bit RGB or greyscale PNG -> (H, W, 3) float32 in [0, 1], sample / 65535, every bit kept.

    Pillow has no 16-bit RGB mode: it unpacks each big-endian sample to its high byte ("RGB;16B"). Unpacking the
    same pixels as little-endian ("RGB;16L": same 48-bit pixels, so the same PNG unfiltering) yields the low bytes.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)

    def opened() -> Image.Image:        # the file is read twice; an in-memory one from its start each time
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return Image.open(source)

    with opened() as img:
        raw = _deep_rawmode(img)
        if raw == "I;16B":
            return np.repeat(np.asarray(img).astype(np.float32)[..., None] / 65535.0, 3, axis=2)
        if raw != "RGB;16B":
            raise ValueError(f"{source}: not a 16-bit PNG")
        high = np.asarray(img).astype(np.uint16)
    with opened() as img:
        t = img.tile[0]
        img.tile = [t._replace(args="RGB;16L") if hasattr(t, "_replace") else (*t[:3], "RGB;16L")]
        low = np.asarray(img).astype(np.uint16)
    return ((high << 8) | low).astype(np.float32) / 65535.0
