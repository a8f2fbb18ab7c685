"""Batches decoded in DataLoader workers, only a rank's own rows, the exact (epoch, position) resume, and the image
folder's index cache (hit, miss, rebuild)."""
import json
import os

import pytest
import torch

from dopsd_fast.data.buckets import BucketBatches
from dopsd_fast.data.folder import ImageFolder
from dopsd_fast.data.loader import BatchLoader
from dopsd_fast.testing import image_folder


def _loader(ds, rank=0, world=1, workers=0, batch=2):
    return BatchLoader(BucketBatches(ds, batch * world, seed=3), rank, world, num_workers=workers)


def _same(a, b):
    return a.prompts == b.prompts and all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))


@pytest.fixture
def folder(tmp_path):
    return ImageFolder(image_folder(tmp_path / "data"), side=32, buckets=3)


class Counting:
    """A data set that records which indices this process decodes."""

    def __init__(self, ds):
        self.ds, self.decoded = ds, []

    def __len__(self):
        return len(self.ds)

    def bucket_members(self):
        return self.ds.bucket_members()

    def captions(self, i):
        return self.ds.captions(i)

    def image(self, i):
        self.decoded.append(i)
        return self.ds.image(i)


def test_workers_give_the_batches_of_the_training_process(folder):
    """2 worker processes (prefetching) and none: the same images and captions, batch for batch, on each of 2
    ranks and at world size 1; a rank's rows are its slice of the global batch."""
    for world in (1, 2):
        ranks = [(_loader(folder, r, world), _loader(folder, r, world, workers=2)) for r in range(world)]
        whole = _loader(folder, batch=2 * world)
        for _ in range(8):                              # past an epoch (10 images, buckets wrap round)
            shares = [(next(a), next(b)) for a, b in ranks]
            assert all(_same(a, b) for a, b in shares)
            ref = next(whole)
            assert [p for a, _ in shares for p in a.prompts] == ref.prompts


def test_each_rank_decodes_only_its_own_rows(folder):
    counted = [Counting(folder) for _ in range(2)]
    loaders = [_loader(c, r, 2) for r, c in enumerate(counted)]
    planned = BucketBatches(folder, 4, seed=3)
    for _ in range(6):
        rows = [i for i, _ in planned.plan()]
        for r, (loader, c) in enumerate(zip(loaders, counted)):
            c.decoded.clear()
            next(loader)
            assert c.decoded == rows[2 * r:2 * r + 2]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_after_n_batches_continues_exactly(folder, workers, world):
    """A checkpoint's state taken while workers have batches in flight: a new loader resumed from it yields what
    the uninterrupted one does next (also when the resumed one uses workers and the first did not)."""
    for rank in range(world):
        first = _loader(folder, rank, world, workers)
        for _ in range(5):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))     # as the checkpoint's state.json holds it
        resumed = _loader(folder, rank, world, 2 - workers)
        resumed.load_state_dict(state)
        assert all(_same(next(first), next(resumed)) for _ in range(5))


def test_loading_a_state_mid_stream_drops_the_batches_in_flight(folder):
    loader, ref = _loader(folder, workers=2), _loader(folder)
    state = loader.state_dict()
    for _ in range(3):
        next(loader)
    loader.load_state_dict(state)                       # back to the start: prefetched batches must not leak
    assert all(_same(next(loader), next(ref)) for _ in range(4))


def _probes(monkeypatch):
    """Counts the images the scan decodes."""
    seen = []
    check = ImageFolder._check_image
    monkeypatch.setattr(ImageFolder, "_check_image", lambda self, p, data: seen.append(p.name) or check(self, p, data))
    return seen


def test_the_index_is_reused_until_the_folder_changes(tmp_path, monkeypatch):
    data, cache = image_folder(tmp_path / "data", n=4), tmp_path / "idx"
    probes = _probes(monkeypatch)
    first = ImageFolder(data, side=32, buckets=3, index_dir=cache)
    assert not first.index_hit and len(probes) == 4 and first.index_file(cache).is_file()

    probes.clear()
    again = ImageFolder(data, side=32, buckets=3, index_dir=cache)
    assert again.index_hit and probes == []
    assert [(r.path, r.captions, r.bucket, r.digest) for r in again.records] == \
        [(r.path, r.captions, r.bucket, r.digest) for r in first.records]
    assert again.summary() == first.summary()
    assert not ImageFolder(data, side=32, buckets=1, index_dir=cache).index_hit      # another scan setting

    os.utime(data / "2.png", ns=(1, 1))                 # touched: the listing's mtime changed
    (data / "junk.png").write_bytes(b"not an image")    # and a new, bad file
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text() +
                                         '\n{"file_name": "junk.png", "caption": "x"}')
    probes.clear()
    rebuilt = ImageFolder(data, side=32, buckets=3, index_dir=cache)
    assert not rebuilt.index_hit and len(probes) == 5
    assert rebuilt.summary()["skipped_files"] == {"corrupt image": ["junk.png"]}
    again = ImageFolder(data, side=32, buckets=3, index_dir=cache)
    assert again.index_hit and again.summary()["skipped_files"] == {"corrupt image": ["junk.png"]}


def test_a_torn_index_file_is_rebuilt(tmp_path):
    data = image_folder(tmp_path / "data", n=3)
    ds = ImageFolder(data, side=32, buckets=3, index_dir=tmp_path)
    ds.index_file(tmp_path).write_text('{"listing": "trunc')
    again = ImageFolder(data, side=32, buckets=3, index_dir=tmp_path)
    assert not again.index_hit and len(again) == 3
    assert ImageFolder(data, side=32, buckets=3, index_dir=tmp_path).index_hit


def test_auto_workers(monkeypatch):
    """None on the CPU; on CUDA up to 4 per rank, one core left to each rank's training process."""
    from dopsd_fast.train.build import data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_workers("auto", cuda=False, world=1) == 0 and data_workers(3, cuda=False, world=1) == 3
    assert [data_workers("auto", cuda=True, world=w) for w in (1, 4, 8, 16)] == [4, 3, 1, 1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")         # 2 ranks on this node, the world spanning others
    assert data_workers("auto", cuda=True, world=16) == 4
