"""WebDataset tar shards: samples grouped by key, the image folder's bad-input rules inside shards, the same crops
as the extracted files, the index cache, workers and the exact resume."""
import io
import json
import tarfile

import pytest
import torch

from dopsd_fast.data.buckets import BucketBatches
from dopsd_fast.data.folder import ImageFolder
from dopsd_fast.data.loader import BatchLoader
from dopsd_fast.data.shards import TarShards, split_key
from dopsd_fast.testing import image_folder


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """The 10 images of testing.image_folder in two shards (a .txt caption in one, .json variants in the other),
    one bad sample of each kind and a file that is no tar; plus the folder to compare with."""
    folder = image_folder(tmp_path / "folder")
    meta = {json.loads(line)["file_name"]: json.loads(line)["caption"]
            for line in (folder / "metadata.jsonl").read_text().splitlines()}
    png = {name: (folder / name).read_bytes() for name in meta}
    first = {f"{i:03d}.{ext}": png[f"{i}.png"] if ext == "png" else f"{meta[f'{i}.png'][0]}".encode()
             for i in range(5) for ext in ("png", "txt")}
    first.update({"nocap.png": png["0.png"][::-1] + b"x", "bad.jpg": b"not a jpeg", "bad.txt": b"x",
                  "latin.png": png["1.png"] + b"\0", "latin.txt": "caf\u00e9".encode("latin-1")})
    second = {f"sub/{i:03d}.{ext}": png[f"{i}.png"] if ext == "png" else json.dumps({"caption": meta[f"{i}.png"]}).encode()
              for i in range(5, 10) for ext in ("png", "json")}      # a sample's members side by side, as webdataset writes them
    second.update({"dup.png": png["7.png"], "dup.txt": b"again"})
    root = tmp_path / "shards"
    root.mkdir()
    _tar(root / "shard-000.tar", first)
    _tar(root / "shard-001.tar", second)
    (root / "shard-002.tar").write_bytes(b"no tar at all" * 100)
    return root, folder


def test_keys_follow_webdataset():
    assert split_key("a/b/img001.seg.png") == ("a/b/img001", "seg.png")
    assert split_key("x.JPG") == ("x", "jpg")


def test_shards_hold_the_folders_samples_and_skip_bad_ones_by_name(shards, caplog):
    root, folder = shards
    ds, ref = TarShards(root, side=32, buckets=3), ImageFolder(folder, side=32, buckets=3)
    captions = sorted(ds.captions(i) for i in range(len(ds)))
    assert captions == sorted([[f"short {i}"] for i in range(5)] + [[f"short {i}", f"long {i}"] for i in range(5, 10)])
    by_caption = {ref.captions(i)[0]: ref.image(i) for i in range(len(ref))}
    assert all(torch.equal(ds.image(i), by_caption[ds.captions(i)[0]]) for i in range(len(ds)))
    assert ds.summary()["skipped_files"] == {
        "missing caption": ["shard-000.tar/nocap.png"], "corrupt image": ["shard-000.tar/bad.jpg"],
        "non-UTF-8 caption": ["shard-000.tar/latin.png"], "duplicate": ["shard-001.tar/dup.png"],
        "corrupt shard": ["shard-002.tar"]}
    assert "shard-000.tar/bad.jpg" in caplog.text


def test_a_truncated_shard_keeps_what_is_before_the_cut(shards):
    root, _ = shards
    data = (root / "shard-001.tar").read_bytes()
    (root / "shard-001.tar").write_bytes(data[:len(data) // 2])
    ds = TarShards(root, side=32, buckets=3)
    skipped = ds.summary()["skipped_files"]
    assert len(ds) == 5 + 3 and skipped["corrupt shard"] == ["shard-001.tar", "shard-002.tar"]
    assert "shard-001.tar/sub/008.png" in skipped["missing caption"]       # its caption lay past the cut


def test_batches_workers_index_and_exact_resume(shards, tmp_path):
    root, _ = shards
    ds = TarShards(root, side=32, buckets=3, index_dir=tmp_path / "idx")
    assert not ds.index_hit and TarShards(root, side=32, buckets=3, index_dir=tmp_path / "idx").index_hit

    def loader(workers):
        return BatchLoader(BucketBatches(ds, 4, seed=1), rank=1, world=2, num_workers=workers)

    first = loader(2)
    for _ in range(3):
        next(first)
    resumed = loader(0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for _ in range(4):
        a, b = next(first), next(resumed)
        assert a.prompts == b.prompts and all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))

    _tar(root / "shard-003.tar", {"new.png": (tmp_path / "folder" / "3.png").read_bytes() + b"\0\0",
                                  "new.txt": b"a new one"})
    grown = TarShards(root, side=32, buckets=3, index_dir=tmp_path / "idx")
    assert not grown.index_hit and len(grown) == len(ds) + 1


def test_training_reads_shards(shards, tmp_path):
    from dopsd_fast.cli import main

    root, _ = shards
    rc = main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
               "--set", "train.steps=1", "--set", "train.resume=null", "--set", "data.kind=webdataset",
               "--set", f"data.path={json.dumps(str(root))}", "--set", "data.buckets=1", "--set", "data.cache_dir=null"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["usable"] == 10 and summary["skipped"] == 5
    assert list((tmp_path / "run" / "data_index").glob("webdataset-*.json"))
