"""WebDataset tar shards (``data.kind: webdataset``): a folder of ``.tar`` files whose members are grouped into
samples by key, ``KEY.jpg`` (or .jpeg/.png/.webp/.bmp) with ``KEY.txt`` (the caption) or ``KEY.json`` (a caption,
list or mapping of variants under caption/captions/text/prompt, as metadata.jsonl).

Why tar shards and why read this way: it is the format large image sets ship in (img2dataset writes it, LAION and
DataComp are published as it), and copying or extracting millions of small files is what it avoids. The shards are
read in place, not streamed through: one pass over the tar headers (tarfile, the standard library) finds each
member's byte offset, and an image is then one seek and one read in a DataLoader worker. So the shards get
everything an image folder has, through the same code: the cached index (rank 0 only, keyed by the shards' sizes
and mtimes), the bad-input checks, aspect buckets, per-rank decoding, and the exact resume, whose (epoch, position)
names a shard and an offset in it. A streaming pipeline (the webdataset package, or ``datasets`` streaming) reads
shards front to back through a shuffle buffer: its resume is per-worker shard positions plus a buffer it cannot
restore, so it is not exact, and aspect buckets would need buffers of their own. Compressed shards (.tar.gz) and
remote URLs are not read: download the shards and keep them uncompressed (their images are compressed already).

Bad input is skipped, named ``SHARD.tar/MEMBER`` and counted as in a folder; a shard that is no tar file, or whose
headers break off, keeps the samples before the break and is counted under "corrupt shard".
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from .folder import CAPTION_KEYS, IMAGE_SUFFIXES, ImageFolder, _variants, read_span


def split_key(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension): WebDataset's rule, the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShards(ImageFolder):
    kind = "webdataset"

    def _shards(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.tar") if p.is_file() and not p.name.startswith("."))

    def _captions(self) -> dict[Path, list[str] | None]:
        """Each sample's image, as the path SHARD/MEMBER, -> its caption variants (None: missing); where its
        member lies goes to ``self._members``, bad captions to ``caption_problems``."""
        self._members: dict[Path, list] = {}
        found: dict[Path, list[str] | None] = {}
        for shard in self._shards():
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:      # r: uncompressed only, so members have byte offsets
                    for member in tar:
                        key, ext = split_key(member.name)
                        samples.setdefault(key, {})[ext] = member
            except (tarfile.TarError, OSError) as err:
                self._skip(shard, "corrupt shard", f"{err}; its samples before the break are used, re-write it")
            for key, members in samples.items():
                image = next((m for ext, m in members.items() if f".{ext}" in IMAGE_SUFFIXES), None)
                if image is None:
                    continue
                path = shard / image.name
                self._members[path] = [self._rel(shard), image.offset_data, image.size]
                found[path] = self._member_captions(shard, path, members)
                if not image.isfile():
                    self.caption_problems[path] = ("not a regular file", "a link or folder inside the tar")
        return found

    def _member_captions(self, shard: Path, path: Path, members: dict) -> list[str] | None:
        text, meta = members.get("txt"), members.get("json")
        try:
            if text is not None:
                return _variants(read_span(shard, text.offset_data, text.size).decode("utf-8"))
            if meta is not None:
                entry = json.loads(read_span(shard, meta.offset_data, meta.size).decode("utf-8"))
                value = next((entry[k] for k in CAPTION_KEYS if k in entry), None) if isinstance(entry, dict) else None
                return _variants(value)
        except UnicodeDecodeError:
            self.caption_problems[path] = ("non-UTF-8 caption", "re-write its caption member as UTF-8")
        except (ValueError, TypeError) as err:          # bad JSON, or a caption that is not text
            self.caption_problems[path] = ("invalid caption", f"{err}; write it as text, a list or a mapping of texts")
        except OSError as err:
            self.caption_problems[path] = ("unreadable file", str(err))
        return None

    def _entry_problem(self, path: Path) -> None:
        return None         # a member's problems are found while listing (caption_problems)

    def _read(self, path: Path) -> bytes:
        shard, offset, size = self._members[path]
        return read_span(self.root / shard, offset, size)

    def _span(self, path: Path) -> list:
        return self._members[path]
