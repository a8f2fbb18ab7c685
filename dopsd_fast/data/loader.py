"""An endless, resumable batch stream: shuffled epochs and one caption variant per sample per iteration.

All randomness is derived from (seed, epoch, position), so the stream's state is two integers and a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    images: list[Tensor]      # (3, H, W) each
    prompts: list[str]        # the caption variant drawn for this iteration


class ResumableStream:
    """The state and the seeding every batch stream shares: (epoch, position), nothing else."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def epoch_generator(self) -> torch.Generator:
        """Seeds the epoch's shuffle."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def position_generator(self) -> torch.Generator:
        """Seeds the caption draws at the current position."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.position)) & 0x7FFFFFFF)

    @staticmethod
    def draw_caption(pair, g: torch.Generator) -> str:
        return pair.captions[int(torch.randint(len(pair.captions), (1,), generator=g))]

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

    def __next__(self) -> Batch:
        images, prompts = [], []
        for _ in range(self.batch_size):
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            pair = self.dataset[order[self.position]]
            images.append(pair.image)
            prompts.append(self.draw_caption(pair, self.position_generator()))
            self.position += 1
        return Batch(images, prompts)
