"""One rank of tests/distributed/test_zero3_build.py: build the DeepSpeed trainer of `tiny-cpu` with argv[2:] set,
write this rank's host memory over the build and the bytes of the weights it holds (``<argv[1]>-rankN.json``),
then gather the weights (ZeRO-3) and write them whole on rank 0 (``<argv[1]>-weights.safetensors``)."""
import json
import resource
import sys

import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch)
import torch
from safetensors.torch import save_file

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None     # gloo does the collectives (run_cli.py)
torch.set_num_threads(1)

from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import destroy_process_group  # noqa: E402
from dopsd_fast.train.trainer import make_trainer  # noqa: E402
from dopsd_fast.train.zero3 import gather_full  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # kB on Linux


cfg = load_config("tiny-cpu", sys.argv[2:])
start = rss()
trainer = make_trainer(cfg, progress=False)
held = [getattr(p, "ds_tensor", p) for p in trainer.model.parameters()]
row = {"rank": trainer.rank, "peak_growth": peak() - start,       # an upper bound: a peak may predate the build
       "weights": sum(t.numel() * t.element_size() for t in held)}
with open(f"{sys.argv[1]}-rank{trainer.rank}.json", "w") as f:
    json.dump(row, f)
params = dict(trainer.model.named_parameters())
whole = gather_full(list(params.values()), [p.ds_tensor for p in params.values()])     # every rank: a collective
if trainer.is_main:
    save_file({k: v.contiguous() for k, v in zip(params, whole)}, f"{sys.argv[1]}-weights.safetensors")
destroy_process_group()
