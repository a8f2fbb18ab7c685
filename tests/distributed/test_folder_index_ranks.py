"""Two gloo ranks open an image folder: rank 0 alone scans it (or reads its index), rank 1 receives the index, and
a folder with nothing usable fails on both ranks with rank 0's message."""
import json
import multiprocessing
from pathlib import Path

import torch.distributed as dist

from dopsd_fast.data.folder import DataError, ImageFolder
from dopsd_fast.testing import image_folder
from dopsd_fast.train.build_qwen import open_folder
from dopsd_fast.train.config import Config
from dopsd_fast.train.distributed import free_port


def _rank(rank: int, port: int, root: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    listed = []
    listing = ImageFolder._listing
    ImageFolder._listing = lambda self: listed.append(1) or listing(self)      # what a scan or a hit reads first
    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.data.image_size, cfg.data.buckets = "folder", str(root / "data"), 32, 3
    cfg.data.cache_dir = str(root / "cache")
    out = {"records": [[str(r.path), r.captions] for r in open_folder(cfg).records], "listed": len(listed)}
    cfg.data.path = str(root / "empty")
    try:
        open_folder(cfg)
    except DataError as err:
        out["error"] = str(err)
    (root / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_rank_0_scans_and_the_others_receive_the_index(tmp_path):
    (tmp_path / "empty").mkdir()
    image_folder(tmp_path / "data", n=4)
    port, fork = free_port(), multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_rank, args=(r, port, tmp_path)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
        assert p.exitcode == 0
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero["records"] == one["records"] and len(zero["records"]) == 4
    assert (zero["listed"], one["listed"]) == (1, 0)
    assert list((tmp_path / "cache" / "index").glob("folder-*.json"))
    assert zero["error"] == one["error"] and "has no usable image-caption pairs" in one["error"]
