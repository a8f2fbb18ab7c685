"""An endless, resumable batch stream: shuffled epochs and one caption variant per sample per iteration.

All randomness is derived from (seed, epoch, position), so the stream's state is two integers and a resumed run
sees exactly the batches the uninterrupted run would have seen.

A stream only plans batches (data set indices and the drawn captions); ``BatchLoader`` decodes a rank's rows of
each planned batch in DataLoader workers. Data sets give ``captions(i)`` without decoding and ``image(i)``.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader


@dataclass
class Batch:
    images: list[Tensor]      # (3, H, W) each
    prompts: list[str]        # the caption variant drawn for this iteration

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True): page-locked images copy to the GPU faster."""
        return Batch([img.pin_memory() for img in self.images], self.prompts)


Rows = list[tuple[int, str]]        # a batch before decoding: (data set index, drawn caption) per row


class ResumableStream:
    """The state and the seeding every batch stream shares: (epoch, position), nothing else.

    Subclasses define ``plan()``, the next global batch's rows; ``next()`` decodes all of them here (one process,
    no rank shares: tests and tools; training reads through ``BatchLoader``)."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return decode(self.dataset, self.plan())

    def plan(self) -> Rows:
        raise NotImplementedError

    def epoch_generator(self) -> torch.Generator:
        """Seeds the epoch's shuffle."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def position_generator(self) -> torch.Generator:
        """Seeds the caption draws at the current position."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.position)) & 0x7FFFFFFF)

    @staticmethod
    def draw_caption(captions: list[str], g: torch.Generator) -> str:
        return captions[int(torch.randint(len(captions), (1,), generator=g))]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class PairStream(ResumableStream):
    def __init__(self, dataset, batch_size: int, seed: int):
        super().__init__(dataset, batch_size, seed)
        self._cached: tuple[int, list[int]] = (-1, [])    # (epoch, its permutation)

    def _order(self) -> list[int]:
        if self._cached[0] != self.epoch:
            self._cached = (self.epoch, torch.randperm(len(self.dataset), generator=self.epoch_generator()).tolist())
        return self._cached[1]

    def plan(self) -> Rows:
        rows = []
        for _ in range(self.batch_size):
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            i = order[self.position]
            rows.append((i, self.draw_caption(self.dataset.captions(i), self.position_generator())))
            self.position += 1
        return rows


class _Decoded:
    """The DataLoader's view of a data set: a planned row (index, caption) -> (image, caption)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, row: tuple[int, str]) -> tuple[Tensor, str]:
        return self.dataset.image(row[0]), row[1]


def _collate(rows: list[tuple[Tensor, str]]) -> Batch:
    return Batch([image for image, _ in rows], [prompt for _, prompt in rows])


def _plans(stream: ResumableStream, rows: slice, states: deque):
    """This rank's rows of each planned batch; ``states`` gets the stream's state after each. A function, not a
    method: a generator holding the loader would make a reference cycle, and the garbage collector then ends the
    DataLoader's workers after its queues are gone (each worker's 5 s timeout instead of a prompt exit)."""
    while True:
        plan = stream.plan()[rows]
        states.append(copy.deepcopy(stream.state_dict()))
        yield plan


def decode(dataset, rows: Rows) -> Batch:
    return _collate([_Decoded(dataset)[row] for row in rows])


class BatchLoader:
    """Rank ``rank``'s rows of each global batch ``stream`` plans, decoded and resized in DataLoader workers.

    ``stream`` plans global batches of ``stream.batch_size`` = B x ``world`` rows; this rank decodes only its rows
    [rank B, (rank + 1) B), so no rank reads another's images. ``num_workers`` processes decode (0: this process),
    each up to ``prefetch`` batches ahead, so the stream has planned further than training has read: the state
    (``state_dict``) is the stream's after the last batch handed out, which a resume continues from exactly, with
    or without workers. Decoding is deterministic, so the batches do not depend on ``num_workers``.
    """

    def __init__(self, stream: ResumableStream, rank: int = 0, world: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2):
        if stream.batch_size % world:
            raise ValueError(f"a global batch of {stream.batch_size} does not split over {world} ranks")
        share = stream.batch_size // world
        self.stream, self.rows = stream, slice(rank * share, (rank + 1) * share)
        self.num_workers, self.pin_memory, self.prefetch = num_workers, pin_memory, prefetch
        self._batches = None                    # the DataLoader's iterator, started by the first next()
        self._states: deque[dict] = deque()     # the stream's state after each batch in flight, oldest first
        self._state = stream.state_dict()

    @property
    def dataset(self):
        return self.stream.dataset

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._states.clear()
            workers = dict(num_workers=self.num_workers, prefetch_factor=self.prefetch) if self.num_workers else {}
            plans = _plans(self.stream, self.rows, self._states)
            self._batches = iter(DataLoader(_Decoded(self.stream.dataset), batch_sampler=plans,
                                            collate_fn=_collate, pin_memory=self.pin_memory, **workers))
        batch = next(self._batches)
        self._state = self._states.popleft()
        return batch

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._batches = None            # workers ahead of the old position stop; the next batch restarts them
        self.stream.load_state_dict(state)
        self._state = copy.deepcopy(self.stream.state_dict())
