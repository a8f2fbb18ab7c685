"""Resume on another world size or ZeRO stage (CPU, gloo): 2 ranks -> 1 process and 1 process -> 2 ranks, from
the checkpoint's safetensors state (student fp32 masters, EMA teacher, AdamW moments by parameter name), with the
data stream carried over in samples: the resumed run holds exactly the saved state and goes on where the other
stopped. (Every image once per epoch across such a resume: test_sharded_stream.py.)"""
import json
import math

import pytest
import torch

pytest.importorskip("deepspeed")

from ds_launch import finish, logged_rows, torchrun  # noqa: E402
from dopsd_fast.testing import tiny_trainer  # noqa: E402
from dopsd_fast.train.checkpoint import load_tensors  # noqa: E402
from dopsd_fast.train.deepspeed_engine import load_shard  # noqa: E402

RUN = ["train.checkpoint_every=1", "train.keep_last=1", "train.report_to=[jsonl]", "train.log_every=1"]
PAIRS = 4          # tiny-cpu's data.num_pairs: the runs cross into epoch 1


def samples_seen(data: dict) -> int:
    """The data stream's position in samples since the start (epoch 0 at position 4 = epoch 1 at 0)."""
    return data["epoch"] * PAIRS + data["position"]


def data_state(step_dir) -> int:
    return samples_seen(json.loads((step_dir / "state.json").read_text())["data"])


def zero2_optimizer_from_shards(step_dir, world: int, names: dict) -> dict:
    """AdamW moments by name rebuilt from DeepSpeed's own ZeRO-2 partitions, independently of reshard.py: the
    ranks' flat partitions end to end are the parameters in group order (param_slice_mappings), unpadded here."""
    parts = [load_shard(step_dir / "deepspeed" / "engine" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", "cpu")
             ["optimizer_state_dict"] for r in range(world)]
    order = list(dict.fromkeys(n for p in parts for n in p["param_slice_mappings"][0]))
    out = {}
    for field in ("exp_avg", "exp_avg_sq"):
        flat = torch.cat([p["base_optimizer_state"]["state"][0][field] for p in parts])
        offset = 0
        for n in order:
            out[f"{n}::{field}"] = flat[offset:offset + names[n].numel()].view(names[n].shape)
            offset += names[n].numel()
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_resume_on_one_process(tmp_path, mode):
    """2 ranks on ZeRO-2 for 2 steps, then the single-process trainer (world 1, no DeepSpeed) to step 4."""
    out = tmp_path / "run"
    finish(torchrun(out, *RUN, "train.steps=2", "deepspeed.stage=2", f"adapter.mode={mode}"))
    ckpt = out / "checkpoints" / "step-000002"
    student = load_tensors(ckpt / "student.safetensors")
    teacher = load_tensors(ckpt / "teacher.safetensors")
    optim = load_tensors(ckpt / "optimizer.safetensors")
    # what reshard.py gathered is DeepSpeed's own state
    for key, t in zero2_optimizer_from_shards(ckpt, 2, student).items():
        assert torch.equal(optim[key], t), key
    assert data_state(ckpt) == 2 * 2

    trainer = tiny_trainer(out, *RUN, "train.steps=4", "train.resume=auto", f"adapter.mode={mode}")
    trainer.load(ckpt)
    for name, p in trainer.roles.trainable.items():
        state = trainer.optimizer.state[p]
        assert torch.equal(p, student[name]), name
        assert torch.equal(state["exp_avg"], optim[f"{name}::exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], optim[f"{name}::exp_avg_sq"]), name
        assert float(state["step"]) == 2.0
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.roles.ema.state_dict().items())
    assert samples_seen(trainer.stream.state_dict()) == 2 * 2

    rest = trainer.train()
    assert trainer.step == 4 and len(rest) == 2 and all(math.isfinite(r.loss) for r in rest)
    assert data_state(out / "checkpoints" / "step-000004") == 2 * 2 + 2 * 1
    assert sorted(logged_rows(out)) == [1, 2, 3, 4]


@pytest.mark.parametrize("mode, stage", [("lora", 3), ("full", 1), ("full", 3)],
                         ids=["lora-zero3", "full-zero1", "full-zero3"])
def test_one_process_resumes_on_two_ranks(tmp_path, mode, stage):
    """The single-process trainer for 2 steps, then 2 ranks on another ZeRO stage to step 3."""
    out = tmp_path / "run"
    tiny_trainer(out, *RUN, "train.steps=2", f"adapter.mode={mode}").train()
    saved = out / "checkpoints" / "step-000002"
    before = load_tensors(saved / "optimizer.safetensors")

    log = finish(torchrun(out, *RUN, "train.steps=3", f"deepspeed.stage={stage}", f"adapter.mode={mode}"))
    # every rank scattered the files into its partitions, gathered them back and found them equal (else it fails)
    assert f"resharded from 1 rank(s) on the single-process trainer to 2 rank(s) on ZeRO-{stage}" in log
    rows = logged_rows(out)
    assert sorted(rows) == [1, 2, 3] and math.isfinite(rows[3]["loss"]) and math.isfinite(rows[3]["grad_norm"])
    step3 = out / "checkpoints" / "step-000003"
    assert data_state(step3) == 2 * 1 + 1 * 2
    # what reshard.py gathered from ZeRO-1/3 partitions is DeepSpeed's own consolidation of its shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    exported = get_fp32_state_dict_from_zero_checkpoint(str(step3 / "deepspeed"), tag="engine",
                                                        exclude_frozen_parameters=True)
    student = load_tensors(step3 / "student.safetensors")
    assert set(student) <= set(exported) and all(torch.equal(exported[k], student[k]) for k in student)
    after = load_tensors(step3 / "optimizer.safetensors")
    assert after.keys() == before.keys()
    assert all(float(after[k]) == 3.0 for k in after if k.endswith("::step"))      # AdamW's count went on
    # one more AdamW step from the saved moments: exp_avg_sq = b2 * saved + (1 - b2) * g^2 >= b2 * saved
    assert all((after[k] >= 0.999 * before[k] * (1 - 1e-6)).all() for k in after if k.endswith("::exp_avg_sq"))
