"""train/zero3.py's helpers against DeepSpeed's own ZeRO-3 partitioning, 2 ranks over gloo: odd parameter sizes (the
last rank's slice padded), whole tensors from slices and back, and gathered_once's one all-gather."""
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

from dopsd_fast.train.distributed import destroy_process_group, end_process, free_port, init_process_group  # noqa: E402


def _worker(rank: int, port: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, DS_ACCELERATOR="cpu")
    import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None    # gloo does the collectives
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from dopsd_fast.train import zero3

    torch.set_num_threads(1)
    init_process_group(timeout_s=60)
    torch.manual_seed(0)        # the same weights on both ranks, as a trainer builds them
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3, bias=False))     # 35, 5 and 15 elements
    whole = [p.detach().clone() for p in model.parameters()]
    deepspeed.zero.Init(module=model, config_dict_or_path={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "memory_efficient_linear": False}})
    params = list(model.parameters())
    checks = {
        "partitioned": all(p.numel() == 0 and p.ds_tensor.numel() == (p.ds_numel + 1) // 2 for p in params),
        "gather_full": all(torch.equal(g, w) for g, w in zip(zero3.gather_full(params, [p.ds_tensor for p in params]),
                                                            whole)),
        # the real elements only: DeepSpeed leaves the padding of the last slice unset (it is never read back)
        "own_slice": all(torch.equal(zero3.own_slice(p, w)[:real], p.ds_tensor[:real])
                         for p, w in zip(params, whole) for real in [min(p.ds_tensor.numel(), p.ds_numel - rank *
                                                                          p.ds_tensor.numel())]),
    }
    counter = zero3.AllGatherCounter.install()
    counter.take()
    with zero3.gathered_once(model):
        checks["gathered"] = all(torch.equal(p.data, w) for p, w in zip(params, whole))
        checks["one all-gather"] = counter.take() == 1
    checks["released"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)
    torch.save(checks, f"{out}/rank{rank}.pt")
    destroy_process_group()
    end_process(0)


def test_slices_round_trip_and_gathered_once(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(free_port()), str(tmp_path)), nprocs=2)
    for rank in range(2):
        checks = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(checks.values()), (rank, checks)
