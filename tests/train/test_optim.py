"""Learning-rate schedules (optim.scheduler, warm-up) and gradient accumulation (optim.grad_accum)."""
import json
import math

import pytest
import torch

from dopsd_fast.testing import randomize_adapters, tiny_trainer
from dopsd_fast.train.checkpoint import CheckpointError
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.optim import lr_factor

LR = 2.0e-3         # tiny-cpu's optim.lr
C1, C3 = (1 + math.cos(math.pi / 4)) / 2, (1 + math.cos(3 * math.pi / 4)) / 2
# train.steps=6, warmup_steps=2: warm-up (s + 1) / 2, then D = 4 steps d = 0..3 of decay
HAND = {"constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
        "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
        "cosine": [0.5, 1.0, 1.0, C1, 0.5, C3]}


@pytest.mark.parametrize("kind", list(HAND))
def test_lr_factor_is_the_hand_computed_schedule(kind):
    assert [lr_factor(s, kind, 2, 6) for s in range(6)] == pytest.approx(HAND[kind], rel=1e-15)
    assert lr_factor(9, kind, 2, 6) == pytest.approx(HAND[kind][-1])     # past train.steps: the last value
    assert [lr_factor(s, kind, 0, 4) for s in range(4)][0] == 1.0        # no warm-up: the first step at optim.lr


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_metrics_lr_is_the_schedulers(tmp_path, kind):
    tiny_trainer(tmp_path, "train.steps=6", "optim.warmup_steps=2", f"optim.scheduler={kind}").train()
    assert [r["lr"] for r in rows(tmp_path)] == pytest.approx([LR * f for f in HAND[kind]], rel=1e-12)


@pytest.mark.parametrize("stop, extra", [(2, ["optim.scheduler=linear"]),          # mid-warm-up
                                         (4, ["optim.scheduler=cosine"]),          # mid-decay
                                         (3, ["optim.scheduler=cosine", "optim.grad_accum=2"])])
def test_resume_gives_the_uninterrupted_lr_losses_and_weights(tmp_path, stop, extra):
    common = ["optim.warmup_steps=3", "train.checkpoint_every=1", "data.num_pairs=3", *extra]   # odd epochs
    straight = tiny_trainer(tmp_path / "a", "train.steps=6", *common)
    ref = straight.train()
    interrupted = tiny_trainer(tmp_path / "b", "train.steps=6", *common)    # the same config: the decay's length
    save = interrupted.save

    def save_then_die():
        path = save()
        if interrupted.step == stop:
            raise KeyboardInterrupt("killed")       # after the checkpoint of step `stop`
        return path
    interrupted.save = save_then_die
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = tiny_trainer(tmp_path / "b", "train.steps=6", "train.resume=auto", *common)
    rest = resumed.train()
    assert [r.losses for r in rest] == [r.losses for r in ref[stop:]]          # bit-exact on CPU
    assert [r["lr"] for r in rows(tmp_path / "b")] == [r["lr"] for r in rows(tmp_path / "a")]
    assert resumed.scheduler.state_dict()["last_epoch"] == straight.scheduler.state_dict()["last_epoch"] == 6
    for k, p in straight.roles.trainable.items():
        assert torch.equal(p, resumed.roles.trainable[k]), k
    assert all(torch.equal(a, b) for a, b in zip(straight.roles.ema.teacher, resumed.roles.ema.teacher))


def test_a_scheduler_state_of_another_step_is_refused(tmp_path):
    tiny_trainer(tmp_path, "train.steps=2", "optim.scheduler=linear").train()
    state_file = tmp_path / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["scheduler"]["last_epoch"] = 5
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="last_epoch 2"):
        tiny_trainer(tmp_path, "train.steps=4", "optim.scheduler=linear", "train.resume=auto").train()


def grads_of_one_step(tmp_path, *overrides):
    trainer = tiny_trainer(tmp_path, "data.num_pairs=3", *overrides)
    randomize_adapters(trainer)         # every LoRA gradient non-zero
    out = trainer.accumulate()
    return out, {k: p.grad.clone() for k, p in trainer.roles.trainable.items()}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_grad_accum_2_at_batch_1_is_one_iteration_at_batch_2(tmp_path, mode):
    # Same pairs, captions and roll-out noise (drawn per sample, in order, before the roll-out; the stream is per
    # sample too): only the batched GEMMs' summation order differs. fp32: grads agree to 1e-5 relative of their size.
    one, g1 = grads_of_one_step(tmp_path / "a", f"adapter.mode={mode}", "train.batch_size=2")
    two, g2 = grads_of_one_step(tmp_path / "b", f"adapter.mode={mode}", "train.batch_size=1", "optim.grad_accum=2")
    assert two.loss == pytest.approx(one.loss, rel=1e-5)
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.tokens == one.tokens and two.flops == pytest.approx(one.flops)
    for k in g1:
        scale = g1[k].abs().max().item()
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5 * scale, rtol=1e-5, msg=k)


@pytest.mark.parametrize("sets, key", [
    (["optim.grad_accum=0"], "optim.grad_accum"),
    (["optim.grad_accum=-1"], "optim.grad_accum"),
    (["optim.scheduler=cosine", "optim.warmup_steps=10", "train.steps=10"], "optim.warmup_steps"),
    (["optim.scheduler=step"], "optim.scheduler"),
])
def test_config_errors_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny-cpu", sets)
    load_config("tiny-cpu", ["optim.warmup_steps=10", "train.steps=10"])      # constant: a warm-up of any length
    load_config("tiny-cpu", ["optim.grad_accum=2", "deepspeed.stage=3"])      # DeepSpeed accumulates too


def test_a_checkpoint_without_scheduler_state_resumes_at_its_step(tmp_path):
    # written before the schedule existed: constant lr with warm-up, which is a function of the step
    common = ["optim.warmup_steps=3", "train.checkpoint_every=2"]
    tiny_trainer(tmp_path / "a", "train.steps=4", *common).train()
    tiny_trainer(tmp_path / "b", "train.steps=2", *common).train()
    state_file = tmp_path / "b" / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("scheduler")["last_epoch"] == 2
    state_file.write_text(json.dumps(state))
    tiny_trainer(tmp_path / "b", "train.steps=4", "train.resume=auto", *common).train()
    assert [r["lr"] for r in rows(tmp_path / "b")] == [r["lr"] for r in rows(tmp_path / "a")]
