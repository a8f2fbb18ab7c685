"""Per-model cache of the packed layouts a forward derives from sample shapes alone.

A forward needs, besides the weights, the packed layout of its token streams: int32 ``cu_seqlens``, the sample id of
every token and the RoPE cos/sin of every position. They depend only on the samples' shapes (latent grid, caption
length, reference sizes), which are the same for all K roll-out steps and both roles of an iteration, and for every
iteration of a size bucket. Built on the host and copied to the device they cost a few host->device copies per
forward, and each such copy from pageable memory waits for the device (torch's ``copy_`` without ``non_blocking``
synchronises the stream), so the host could not queue the next kernels while the previous forward ran.

:class:`LayoutCache` keeps the last ``maxsize`` layouts, device-resident, keyed by the shapes (and the device): a
hit returns the very tensors the miss built, so outputs are bitwise those of a fresh build. Layout tensors are
constants (no autograd), never written in place.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

# Per model and per kind (context, forward). An iteration uses 2 context and 2 forward layouts (teacher and student
# contexts differ in length), K times each; a bucketed data set cycles through more. Z-Image at 1024^2 holds ~4 MiB
# of RoPE tables per forward layout (4.2k tokens x 64 pairs x fp32 x cos and sin), so 8 cost ~32 MiB.
MAXSIZE = 8


class LayoutCache:
    """LRU of layouts by key; ``builds`` counts misses (what the tests count)."""

    def __init__(self, maxsize: int = MAXSIZE):
        self.maxsize = maxsize
        self.builds = 0
        self._entries: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable | None, build: Callable[[], T]) -> T:
        """The layout cached under ``key``, else ``build()`` (kept unless ``key`` is None: not known to be a function
        of the key, e.g. a hand-made context)."""
        if key is not None and key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]   # type: ignore[return-value]
        self.builds += 1
        value = build()
        if key is not None and self.maxsize > 0:
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
