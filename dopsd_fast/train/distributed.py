"""Process group, ranks, per-rank seeds and the collectives the trainer runs outside DeepSpeed.

Launch with ``torchrun --nproc_per_node N`` (or ``--nnodes``), or the ``deepspeed`` launcher; both export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A plain ``python`` start is a world of one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from . import watchdog


def launched_world_size() -> int:
    """Processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKSTOP_S = 15.0     # the process group's timeout past deepspeed.timeout_s (the bound: timeout_s + 30 s)
_joined = False       # whether this process called init_process_group (end_process)


def init_process_group(timeout_s: float) -> None:
    """Join (or, started without a launcher, create) the default process group.

    ``timeout_s`` bounds the rendezvous and the collectives where the backend honours it; gloo does not inside a
    ring all-reduce (a SIGSTOPped peer hangs the others), so a multi-rank run also arms watchdog.py around them.
    The group's own timeout is ``BACKSTOP_S`` later: where both apply, the watchdog's clear exit 76 comes first
    instead of the backend's exception (a traceback, exit 1), which stays the backstop for unguarded waits.
    """
    import deepspeed

    global _joined
    _joined = True
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:     # without these, DeepSpeed tries MPI discovery (and needs mpi4py)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s + BACKSTOP_S))


def destroy_process_group() -> None:
    """Leave the default group, every rank together: a barrier, then the teardown. The groups DeepSpeed still
    references keep their worker threads, so a rank's process then ends through ``end_process``."""
    if dist.is_initialized():
        with watchdog.guard("the teardown barrier"):
            dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """Exit with ``code``. A process that joined a process group (init_process_group) ends with ``os._exit``, after
    flushing stdout, stderr and logging, without the interpreter's teardown.

    Why: gloo has no shutdown, and DeepSpeed keeps the groups referenced past destroy_process_group (each ZeRO-3
    parameter's ``ds_process_group``; the engine stays reachable from deepspeed's ``FWD_MODULE_STACK``), so the
    groups' worker threads still run while Python finalizes. One that releases a finished collective (its tensor's
    Python object) then waits for the GIL, the finalizing interpreter ends that thread (pthread_exit), and the unwind
    through a noexcept destructor calls std::terminate: SIGABRT, "terminate called without an active exception", after
    a run that finished (1 in 59 four-rank ZeRO-3 runs on 2 cores; the core's stack: ProcessGroupGloo::runLoop ->
    ~AsyncBarrierWork -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil -> pthread_exit). Every file
    a command writes is closed before it returns, so the teardown has nothing left to do."""
    if not _joined:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):      # a closed or broken pipe: nothing left to flush
            stream.flush()
    os._exit(code)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        with watchdog.guard("a barrier"):
            dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's noise seed. Rank 0 keeps ``seed``, so a world of one draws what the single-process trainer draws."""
    return seed + 1_000_003 * rank


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of a few floats over all ranks (one all-reduce)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    with watchdog.guard("the all-reduce of logged means"):
        dist.all_reduce(t)
    return (t / world_size()).tolist()


def any_over_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce of one number; on the GPU where NCCL runs them)."""
    if world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    with watchdog.guard("the all-reduce of a flag (stop agreement)"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def from_rank0(make, what: str):
    """``make()`` run on rank 0 only, its result on every rank; an exception it raises is raised on every rank.

    While rank 0 works (a data scan may outlast ``deepspeed.timeout_s``), all ranks meet in an all-reduce once a
    second: no collective waits long enough to time out, and a rank 0 that dies or hangs still ends the others
    through the watchdog. Then one broadcast hands the result over."""
    if world_size() == 1:
        return make()
    box: list = [None]
    if rank() == 0:
        def run():
            try:
                box[0] = make()
            except Exception as err:        # handed to every rank below
                box[0] = err
        worker = threading.Thread(target=run, name=f"dopsd-{what}", daemon=True)
        worker.start()
    while not any_over_ranks(rank() == 0 and not worker.is_alive()):
        time.sleep(1.0)
    with watchdog.guard(f"the broadcast of {what}"):
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]
