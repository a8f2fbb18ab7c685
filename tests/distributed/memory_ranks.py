"""One rank of tests/distributed/test_memory_plan.py: for each case, build the DeepSpeed trainer, train one step and
write what this rank holds, by what holds it, beside the memory plan's numbers (JSON lines into argv[1])."""
import json
import sys

import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch)
import torch

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None     # gloo does the collectives (run_cli.py)
torch.set_num_threads(1)

from dopsd_fast.method.roles import FullRoles  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import destroy_process_group, end_process  # noqa: E402
from dopsd_fast.train.memory import (ActivationMeter, optimizer_tensors, rank_memory,  # noqa: E402
                                     student_activations)
from dopsd_fast.train.reshard import inner_optimizer  # noqa: E402
from dopsd_fast.train.trainer import make_trainer  # noqa: E402

# a mid-size tiny model (4.5 M base parameters, 0.31 M per adapter) so that weights outweigh DeepSpeed's own
# bookkeeping, at 64^2 so that activations are in the MiB too
MID = ["model.arch.dim=256", "model.arch.n_heads=4", "model.arch.n_kv_heads=4", "model.arch.axes_dims=[16,24,24]",
       "adapter.rank=16", "data.image_size=64", "train.steps=1", "train.checkpoint_every=100", "train.resume=null"]
CASES = [["deepspeed.stage=0"], ["deepspeed.stage=1"], ["deepspeed.stage=2"], ["deepspeed.stage=3"],
         ["deepspeed.stage=2", "adapter.mode=full"], ["deepspeed.stage=3", "adapter.mode=full"]]


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}


def reachable(obj, depth: int = 3):
    """The tensors among ``obj``'s attributes, lists and dicts (DeepSpeed's optimizer keeps its buffers there)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from reachable(item, depth - 1)
    elif depth and isinstance(obj, dict):
        for item in obj.values():
            yield from reachable(item, depth - 1)


def measure(out_dir: str, sets: list[str]) -> dict:
    cfg = load_config("tiny-cpu", [f"train.output_dir={out_dir}", "model.dtype=bf16", *MID, *sets])
    trainer = make_trainer(cfg, progress=False)
    model, roles, engine = trainer.model, trainer.roles, trainer.engine
    seen: dict[str, int] = {"gathered": 0}
    weights = [*model.parameters(), *(roles.teacher_model.parameters() if isinstance(roles, FullRoles) else [])]

    def held() -> tuple[dict, dict, dict]:
        p = storages([getattr(q, "ds_tensor", q) for q in weights])       # ZeRO-3: this rank's slices
        inner = inner_optimizer(engine)
        masters = [q for g in inner.param_groups for q in g["params"]]
        masters += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])    # ZeRO-3's, in the groups at step()
        o = {k: v for k, v in storages([*optimizer_tensors(inner), *masters]).items() if k not in p}
        e = {k: v for k, v in storages(roles.ema.master).items() if k not in p}
        return p, o, e

    def step(inner_step):       # engine.step: the gradients are all there, none applied yet
        def measured(*args, **kwargs):
            p, o, e = held()
            grads = storages([*reachable(vars(engine.optimizer)), *(q.grad for q in model.parameters()
                                                                     if q.grad is not None)])
            seen["gradients"] = sum(v for k, v in grads.items() if k not in p | o | e)
            return inner_step(*args, **kwargs)
        return measured

    def backward(inner_backward):       # inside the roll-out: ZeRO-3 holds the gathered parameters
        def measured(loss):
            if trainer.zero3:       # whole tensors beside this rank's own slices (the plan's "parameters")
                whole = storages([q.data for q in weights])
                seen["gathered"] = max(seen["gathered"], sum(whole.values()))
            return inner_backward(loss)
        return measured

    engine.step, trainer.backward = step(engine.step), backward(trainer.backward)
    meter, forward_backward = ActivationMeter(model), trainer.forward_backward_step

    def metered(batch):
        with meter:
            return forward_backward(batch)

    trainer.forward_backward_step = metered
    trainer.save = lambda: None      # what the ranks hold while training, not a checkpoint's gathers
    trainer.train()
    p, o, e = held()
    seen["gathered"] -= sum(p.values()) if trainer.zero3 else 0
    activations = student_activations(cfg, trainer.plan.arch)
    plan = rank_memory(cfg, trainer.plan.total_params, trainer.plan.trainable_params, activations, cfg.deepspeed.stage,
                       trainer.world)
    return {"case": " ".join(sets), "rank": trainer.rank,
            "measured": {"parameters": sum(p.values()), "optimizer": sum(o.values()), "ema_master": sum(e.values()),
                         "activations": meter.peak, **seen},
            "plan": {k: getattr(plan, k) for k in ("parameters", "optimizer", "ema_master", "gradients", "gathered",
                                                   "activations")}}


if __name__ == "__main__":
    out = sys.argv[1]
    rows = [measure(f"{out}/run-{i}", sets) for i, sets in enumerate(CASES)]
    rank = rows[0]["rank"]
    with open(f"{out}/rank{rank}.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    destroy_process_group()
    end_process(0)
