"""Aspect-ratio buckets around a target area, resize-shorter + center-crop, and batches within one bucket.

The authors train Z-Image on 11 buckets near 1024^2 (1024^2, 1152x896, ..., 1344x576): one square bucket and
five per orientation with aspect ratios spaced geometrically up to about 2.33, sides rounded to a multiple.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .loader import ResumableStream, Rows

MAX_ASPECT = 1344 / 576


def make_buckets(side: int, count: int = 11, multiple: int | None = None) -> list[tuple[int, int]]:
    """``count`` (height, width) buckets of area about side^2, sides multiples of ``multiple`` (default side/16, >= 16).

    An odd count gives one square bucket and (count-1)/2 landscape + as many portrait ones; 1 gives the square only.
    """
    if count < 1 or count % 2 == 0:
        raise ValueError(f"bucket count must be odd (square + pairs of orientations), got {count}")
    m = multiple or max(16, side // 16)
    per_side = (count - 1) // 2
    out = [(side // m * m, side // m * m)]
    for i in range(1, per_side + 1):
        ratio = MAX_ASPECT ** (i / per_side)
        w = max(m, round(side * math.sqrt(ratio) / m) * m)
        h = max(m, round(side / math.sqrt(ratio) / m) * m)
        out += [(h, w), (w, h)]
    return sorted(set(out), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest in log space."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - r))


def cover_size(img_height: int, img_width: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) an image is resized to so it covers a (height, width) bucket; the centre crop keeps
    height * width of it."""
    scale = max(height / img_height, width / img_width)
    return max(width, round(img_width * scale)), max(height, round(img_height * scale))


def resize_center_crop(img: Image.Image | np.ndarray, height: int, width: int) -> Tensor:
    """Scale so the image covers (height, width) (the shorter side relative to the bucket fits), crop the centre;
    returns (3, height, width) in [-1, 1].

    ``img``: an 8-bit PIL image (converted to RGB), or an (H, W, 3) float32 array in [0, 1] (a 16-bit source,
    resized per channel in Pillow's float mode so none of its depth is rounded away; Lanczos overshoot is clipped
    to [0, 1] as the 8-bit path clips it to 0..255)."""
    h0, w0 = img.shape[:2] if isinstance(img, np.ndarray) else (img.height, img.width)
    size = cover_size(h0, w0, height, width)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    box = (left, top, left + width, top + height)
    if isinstance(img, np.ndarray):
        planes = [Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32))        # mode "F"
                  .resize(size, Image.Resampling.LANCZOS).crop(box) for c in range(3)]
        return torch.from_numpy(np.stack([np.asarray(p) for p in planes])).clamp(0.0, 1.0) * 2.0 - 1.0
    img = img.convert("RGB").resize(size, Image.Resampling.LANCZOS).crop(box)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


class BucketBatches(ResumableStream):
    """Endless resumable batches whose images share one bucket (so they stack into one latent shape).

    Each epoch shuffles every bucket, cuts it into batches (the last one wraps round within the bucket, so no
    image is dropped and batches are full), then shuffles the batch order. One caption variant is drawn per image
    per iteration. State = (epoch, position), all randomness from (seed, epoch, position), like ``PairStream``.

    Position counts batches, so it holds for one batch size (the global batch: train.batch_size x world). A run
    resumed with another one (another world size) finishes the epoch on the images the interrupted run had not
    reached, cut into batches of the new size (``resharded``: the (batch size, batches done) of each earlier
    part of the epoch, in the state); no image is skipped or seen twice, beyond the wrap-round of a bucket's
    last batch.
    """

    def __init__(self, dataset, batch_size: int, seed: int):
        super().__init__(dataset, batch_size, seed)
        self.resharded: list[list[int]] = []
        self._cached: tuple[tuple, list[list[int]]] = ((), [])

    @staticmethod
    def _cut(orders: list[list[int]], size: int, g: torch.Generator) -> list[list[int]]:
        """Each bucket's images in batches of ``size`` (the last wraps round within the bucket), shuffled."""
        batches = []
        for order in orders:
            n = math.ceil(len(order) / size) * size
            order = [order[i % len(order)] for i in range(n)]
            batches += [order[i:i + size] for i in range(0, n, size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def _batches(self) -> list[list[int]]:
        key = (self.epoch, self.batch_size, *map(tuple, self.resharded))
        if self._cached[0] != key:
            g = self.epoch_generator()
            orders = [[members[i] for i in torch.randperm(len(members), generator=g).tolist()]
                      for members in self.dataset.bucket_members().values()]
            sizes = [size for size, _ in self.resharded] + [self.batch_size]
            batches, seen = self._cut(orders, sizes[0], g), set()
            for (_, done), size in zip(self.resharded, sizes[1:]):
                seen.update(i for b in batches[:done] for i in b)
                rest = dict.fromkeys(i for b in batches[done:] for i in b if i not in seen)
                orders = [[i for i in order if i in rest] for order in orders]
                batches = self._cut([o for o in orders if o], size, g)
            self._cached = (key, batches)
        return self._cached[1]

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "batch_size": self.batch_size}
        return {**state, "resharded": self.resharded} if self.resharded else state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.resharded = [[int(size), int(done)] for size, done in state.get("resharded", [])]
        size = int(state.get("batch_size", self.batch_size))
        if size != self.batch_size and 0 < self.position:
            self.resharded.append([size, self.position])
            self.position = 0
            if not self._batches():         # the epoch was finished: the next one starts whole
                self.epoch, self.resharded = self.epoch + 1, []

    def plan(self) -> Rows:
        if self.position >= len(self._batches()):
            self.epoch, self.position, self.resharded = self.epoch + 1, 0, []
        g = self.position_generator()
        rows = [(i, self.draw_caption(self.dataset.captions(i), g)) for i in self._batches()[self.position]]
        self.position += 1
        return rows
