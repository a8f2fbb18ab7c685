"""Rank shares of the global batch: folder data keeps the single-process bucket stream, so every global batch is
one aspect bucket and each rank's rows stack into one latent shape."""
import pytest
import torch

from dopsd_fast.data.buckets import BucketBatches
from dopsd_fast.data.loader import BatchLoader, PairStream
from dopsd_fast.data.synthetic import Pair


def rank_share(data, batch: int, seed: int, rank: int, world: int, stream_cls) -> BatchLoader:
    """Rank ``rank``'s share of global batches of ``batch`` x ``world``, as the trainers build it."""
    return BatchLoader(stream_cls(data, batch * world, seed), rank, world)


class TwoBuckets:
    """7 landscape and 5 portrait images (odd counts: the last batch of a bucket wraps round)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.pairs = [Pair(torch.rand(3, 8, 12, generator=g), [f"wide {i}"]) for i in range(7)]
        self.pairs += [Pair(torch.rand(3, 12, 8, generator=g), [f"tall {i}"]) for i in range(5)]

    def bucket_members(self):
        return {(8, 12): list(range(7)), (12, 8): list(range(7, 12))}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def captions(self, i):
        return self.pairs[i].captions

    def image(self, i):
        return self.pairs[i].image


def test_rank_shares_of_bucketed_global_batches():
    data, world, batch = TwoBuckets(), 2, 2
    ranks = [rank_share(data, batch, 5, r, world, BucketBatches) for r in range(world)]
    whole = BucketBatches(data, batch * world, 5)
    for _ in range(9):                          # over an epoch boundary
        shares, ref = [next(s) for s in ranks], next(whole)
        for share in shares:
            assert len(share.images) == batch and len({img.shape for img in share.images}) == 1
        assert shares[0].images[0].shape == shares[1].images[0].shape      # one bucket per global batch
        assert [p for s in shares for p in s.prompts] == ref.prompts
        assert all(torch.equal(a, b) for a, b in zip([i for s in shares for i in s.images], ref.images))
    state = ranks[1].state_dict()
    resumed = rank_share(data, batch, 5, 1, world, BucketBatches)
    resumed.load_state_dict(state)
    assert next(resumed).prompts == next(ranks[1]).prompts


class EvenBuckets(TwoBuckets):
    """8 landscape and 4 portrait images: batches of 2 or 4 never wrap round, so an epoch holds each image once."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.pairs = [Pair(torch.rand(3, 8, 12, generator=g), [f"wide {i}"]) for i in range(8)]
        self.pairs += [Pair(torch.rand(3, 12, 8, generator=g), [f"tall {i}"]) for i in range(4)]

    def bucket_members(self):
        return {(8, 12): list(range(8)), (12, 8): list(range(8, 12))}


def _epoch_across_resumes(data, stream_cls, batch: int, worlds: list[int], iters: list[int]) -> list[str]:
    """Prompts of every rank over ``iters[i]`` global batches on ``worlds[i]`` ranks, each part resumed from the
    state the one before it left (the global stream's, as a checkpoint holds it)."""
    seen, state = [], None
    for world, n in zip(worlds, iters):
        ranks = [rank_share(data, batch, 5, r, world, stream_cls) for r in range(world)]
        if state is not None:
            for s in ranks:
                s.load_state_dict(state)
        for _ in range(n or 99):
            state = ranks[0].state_dict()
            rows = [p for s in ranks for p in next(s).prompts]
            if n is None and ranks[0].state_dict()["epoch"] > 0:       # n None: to the end of the epoch
                break
            seen += rows
        else:
            state = ranks[0].state_dict()
    return seen


@pytest.mark.parametrize("worlds", [[2, 1], [1, 2], [2, 1, 2]], ids=lambda w: "->".join(map(str, w)))
def test_resume_on_another_world_size_sees_each_sample_once(worlds):
    """A run resumed on another number of ranks continues the epoch where the old one stopped: over the epoch
    across the resume(s) every image is seen exactly once, whether positions count samples (pairs) or global
    batches (aspect buckets, whose unseen rest of the epoch is cut to the new global batch)."""
    data = EvenBuckets()
    captions = sorted(p.captions[0] for p in data.pairs)
    iters = {(2, 1): [1, 4], (1, 2): [2, 2], (2, 1, 2): [1, 2, 1]}[tuple(worlds)]     # 12 images, 2 per rank
    assert sorted(_epoch_across_resumes(data, PairStream, 2, worlds, iters)) == captions
    seen = _epoch_across_resumes(data, BucketBatches, 2, worlds, [*iters[:-1], None])
    if worlds != [2, 1, 2]:
        assert sorted(seen) == captions
    else:       # the last 4 images may be 2 wide + 2 tall: two global batches of 4, each wrapping round its bucket
        assert sorted(seen[:8] + list(dict.fromkeys(seen[8:]))) == captions and len(seen) in (12, 16)
    # and the next epoch starts whole on the last world size
    world = worlds[-1]
    after = _epoch_across_resumes(data, BucketBatches, 2, worlds + [world], [*iters[:-1], None, 12 // (2 * world)])
    assert sorted(after[len(seen):]) == captions
