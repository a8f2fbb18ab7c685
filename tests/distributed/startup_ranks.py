"""One rank of tests/distributed/test_zero3_build.py: build the DeepSpeed trainer of `tiny-cpu` with argv[2:] set,
write this rank's host memory over the build and the bytes it holds: weights (both roles' modules) and optimizer
state (``<argv[1]>-rankN.json``); then gather the weights (ZeRO-3) and write them whole on rank 0
(``<argv[1]>-weights.safetensors``, the teacher module's under ``teacher.`` when full fine-tuning has one)."""
import json
import resource
import sys

import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch)
import torch
from safetensors.torch import save_file

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None     # gloo does the collectives (run_cli.py)
torch.set_num_threads(1)

from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import destroy_process_group, end_process  # noqa: E402
from dopsd_fast.train.trainer import make_trainer  # noqa: E402
from dopsd_fast.train.zero3 import gather_full  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # kB on Linux


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one flat buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def tensors_of(obj) -> list[torch.Tensor]:
    """The tensors DeepSpeed's ZeRO-3 optimizer holds as attributes (flat buffers, lists of them) and in its inner
    optimizer's state."""
    out = []
    for value in vars(obj).values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(t):
                out.append(t)
    return out + [t for st in obj.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]


cfg = load_config("tiny-cpu", sys.argv[2:])
start = rss()
trainer = make_trainer(cfg, progress=False)
models = {"": trainer.model, "teacher.": trainer.roles.teacher_model}
if models["teacher."] is trainer.model:       # LoRA: one module
    del models["teacher."]
weights = [getattr(p, "ds_tensor", p) for m in models.values() for p in m.parameters()]
optimizer = [t for t in tensors_of(trainer.optimizer) if t.numel()]
row = {"rank": trainer.rank, "peak_growth": peak() - start,       # an upper bound: a peak may predate the build
       "weights": storage_bytes(weights), "optimizer": storage_bytes(weights + optimizer) - storage_bytes(weights)}
with open(f"{sys.argv[1]}-rank{trainer.rank}.json", "w") as f:
    json.dump(row, f)
out = {}
for prefix, model in models.items():
    params = dict(model.named_parameters())
    whole = gather_full(list(params.values()), [p.ds_tensor for p in params.values()])     # every rank: a collective
    out |= {prefix + k: v.contiguous() for k, v in zip(params, whole)}
if trainer.is_main:
    save_file(out, f"{sys.argv[1]}-weights.safetensors")
destroy_process_group()
end_process(0)
