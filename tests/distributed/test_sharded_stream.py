"""Rank shares of the global batch: folder data keeps the single-process bucket stream, so every global batch is
one aspect bucket and each rank's rows stack into one latent shape."""
import torch

from dopsd_fast.data.buckets import BucketBatches
from dopsd_fast.data.synthetic import Pair
from dopsd_fast.train.distributed import ShardedStream


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


def test_rank_shares_of_bucketed_global_batches():
    data, world, batch = TwoBuckets(), 2, 2
    ranks = [ShardedStream(data, batch, 5, r, world, BucketBatches) for r in range(world)]
    whole = BucketBatches(data, batch * world, 5)
    for _ in range(9):                          # over an epoch boundary
        shares, ref = [next(s) for s in ranks], next(whole)
        for share in shares:
            assert len(share.images) == batch and len({img.shape for img in share.images}) == 1
        assert shares[0].images[0].shape == shares[1].images[0].shape      # one bucket per global batch
        assert [p for s in shares for p in s.prompts] == ref.prompts
        assert all(torch.equal(a, b) for a, b in zip([i for s in shares for i in s.images], ref.images))
    state = ranks[1].state_dict()
    resumed = ShardedStream(data, batch, 5, 1, world, BucketBatches)
    resumed.load_state_dict(state)
    assert next(resumed).prompts == next(ranks[1]).prompts
