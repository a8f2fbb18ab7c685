"""Two "nodes" on one machine: two torchrun launchers (--nnodes=2, --node_rank=0/1, one process each, rendezvous on
127.0.0.1), so each rank has LOCAL_RANK 0 and only RANK tells them apart. Two ZeRO-2 steps of tiny-cpu on an image
folder, into one output_dir (as on a shared file system), each node with its own data cache (a node-local disk)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dopsd_fast.train.distributed import free_port

pytest.importorskip("deepspeed")

from ds_launch import RUN_CLI, finish, logged_rows, rank_env, torchrun, train_args  # noqa: E402

RUN = ["deepspeed.stage=2", "train.steps=2", "train.checkpoint_every=1", "train.batch_size=2", "data.kind=folder",
       "data.buckets=1"]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture number {i}")
    return folder


def node(rank: int, port: int, out, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", RUN_CLI, "train", *train_args(out, *sets)]
    return subprocess.Popen(cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_train_as_two_ranks_of_one_node_and_rank_0_writes(tmp_path, images):
    out, port = tmp_path / "two-nodes", free_port()
    nodes = [node(r, port, out, *RUN, f"data.path={images}", f"data.cache_dir={tmp_path / f'cache-node{r}'}")
             for r in (0, 1)]
    one_node = torchrun(tmp_path / "one-node", *RUN, f"data.path={images}", f"data.cache_dir={tmp_path / 'cache'}")
    logs = [finish(p) for p in nodes]
    finish(one_node)
    assert "checkpoint:" in logs[0] and "checkpoint:" not in logs[1]      # one report, by global rank 0
    last = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in last.glob("rng-rank*")) == ["rng-rank00000.safetensors", "rng-rank00001.safetensors"]
    state, single = (json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())
                     for run in (out, tmp_path / "one-node"))
    assert state["world_size"] == 2 and state["data"] == single["data"]      # the global stream's position
    # global rank 0 scans the folder and keeps its index in its node's cache; node 1 receives it and writes nothing
    assert list((tmp_path / "cache-node0").rglob("*.json")) and not list((tmp_path / "cache-node1").rglob("*"))
    # one metrics row per step, equal to two ranks on one node: the rows and the roll-out noise of each rank follow
    # its global RANK (with LOCAL_RANK both nodes would train on rank 0's rows and draw rank 0's noise)
    two, one = logged_rows(out), logged_rows(tmp_path / "one-node")
    assert list(two) == [1, 2]
    for step in two:
        assert two[step]["losses"] == pytest.approx(one[step]["losses"], rel=1e-6)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-6)
