"""2 CPU ranks over gloo, ZeRO-2: a run whose ranks are SIGKILLed (by pid) at a random point between checkpoints
resumes and reproduces the uninterrupted run exactly, and zero_to_fp32 exports its student; a rank that dies makes
the others exit non-zero instead of hanging."""
import json
import os
import random
import signal
import time

import pytest
import torch

pytest.importorskip("deepspeed")

from ds_launch import bare_ranks, finish, logged_rows, torchrun  # noqa: E402
from dopsd_fast.testing import wait_for_rows  # noqa: E402
from dopsd_fast.train.checkpoint import list_checkpoints, load_tensors  # noqa: E402

STEPS = 4
RUN = [f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=2", "deepspeed.stage=2",
       "optim.warmup_steps=3", "train.report_to=[jsonl]",
       "validation.every=2", "validation.pairs=2", "validation.steps=2"]      # grids on rank 0 must not shift a loss


def test_sigkill_at_random_point_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    finish(torchrun(straight, *RUN))
    ref = logged_rows(straight)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert_zero_to_fp32_matches_student(straight / "checkpoints" / f"step-{STEPS:06d}")   # (saves a launch)
    grids = (straight / "validation" / "grids.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in grids] == [2, 4]        # rank 0 alone writes the grids

    killed = tmp_path / "killed"
    rng = random.Random(os.getpid())
    after = rng.randint(1, STEPS - 2)      # the checkpoint to wait for; the kill lands in one of the next steps
    ranks = bare_ranks(killed, *RUN)       # each rank's own pid: torchrun's workers sit in sessions of their own
    try:
        wait_for_checkpoint(killed, after, ranks)
        sec = logged_rows(killed)[after]["sec"]
        time.sleep(rng.uniform(0, 0.8 * sec))    # mid-step, mid-validation or mid-save of a later step
        alive = [p.poll() is None for p in ranks]
    finally:
        for p in ranks:
            p.send_signal(signal.SIGKILL)      # (a no-op on a process already reaped)
        outputs = [p.communicate()[0] for p in ranks]
    assert all(alive), f"a rank ended before the kill: {outputs[alive.index(False)][-4000:]}"
    assert [p.returncode for p in ranks] == [-signal.SIGKILL] * len(ranks)
    rows = logged_rows(killed)           # what the kill left: rows and checkpoints, the last step not reached
    survivors = [int(p.name.split("-")[1]) for p in list_checkpoints(killed / "checkpoints")]
    print(f"SIGKILL {rows and max(rows)} logged steps, checkpoints {survivors}")
    assert rows and max(rows) < STEPS and sorted(rows) == list(range(1, max(rows) + 1))
    assert survivors and after <= max(survivors) < STEPS

    finish(torchrun(killed, *RUN))
    resumed = logged_rows(killed)
    assert sorted(resumed) == sorted(ref)
    for step in ref:    # bit-exact: same data shards, per-rank noise, optimizer moments, EMA and lr schedule
        for key in ("loss", "losses", "grad_norm", "lr"):
            assert resumed[step][key] == ref[step][key], f"step {step} {key} (killed after checkpoint {after})"
    last = f"checkpoints/step-{STEPS:06d}"
    for part in ("student", "teacher"):
        a = load_tensors(straight / last / f"{part}.safetensors")
        b = load_tensors(killed / last / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def wait_for_checkpoint(out, step: int, ranks, timeout: float = 600) -> None:
    """Until ``out`` holds the complete checkpoint ``step``; every rank alive throughout, else its output is shown."""
    deadline = time.monotonic() + timeout
    while not (out / "checkpoints" / f"step-{step:06d}" / "state.json").is_file():
        for p in ranks:
            assert p.poll() is None, p.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"{out}: no checkpoint {step} after {timeout} s"
        time.sleep(0.02)


def assert_zero_to_fp32_matches_student(step_dir) -> None:
    """DeepSpeed's own consolidation of the ZeRO-2 shards gives back the student the checkpoint holds."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = get_fp32_state_dict_from_zero_checkpoint(str(step_dir / "deepspeed"), tag="engine",
                                                        exclude_frozen_parameters=True)
    student = load_tensors(step_dir / "student.safetensors")
    assert set(exported) == set(student)
    assert all(torch.equal(exported[k], student[k]) for k in student)


def test_dead_rank_fails_the_others(tmp_path):
    """Bare ranks (no launcher to reap them): rank 1 is SIGKILLed mid-run; rank 0 must exit non-zero, not hang."""
    out = tmp_path / "run"
    ranks = bare_ranks(out, "train.steps=50", "deepspeed.stage=2", "deepspeed.timeout_s=30",
                       "train.checkpoint_every=1000")
    try:
        wait_for_rows(out, 1, ranks[0])
        ranks[1].kill()
        tic = time.monotonic()
        ranks[0].communicate(timeout=90)
        assert ranks[0].returncode != 0
        print(f"rank 0 exited with {ranks[0].returncode} {time.monotonic() - tic:.1f} s after rank 1 died")
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
