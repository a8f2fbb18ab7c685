"""Under DeepSpeed (1 CPU rank under torchrun, ZeRO-2) the torch lr schedule gives the single-process trainer's lr
sequence, and a resume from a mid-decay checkpoint continues it (and the losses) exactly. (optim.grad_accum under
DeepSpeed: test_deepspeed_engine.py, in-process.)"""
import pytest

pytest.importorskip("deepspeed")

from ds_launch import finish, logged_rows, torchrun  # noqa: E402
from dopsd_fast.testing import tiny_trainer  # noqa: E402

RUN = ["train.steps=5", "train.checkpoint_every=1", "optim.scheduler=cosine", "optim.warmup_steps=2",
       "train.report_to=[jsonl]"]


def test_deepspeed_runs_the_single_process_lr_schedule_and_resumes_it(tmp_path):
    tiny_trainer(tmp_path / "plain", *RUN).train()
    plain = logged_rows(tmp_path / "plain")
    finish(torchrun(tmp_path / "ds", *RUN, "deepspeed.stage=2", nproc=1))
    ds = logged_rows(tmp_path / "ds")
    assert [ds[s]["lr"] for s in sorted(ds)] == [plain[s]["lr"] for s in sorted(plain)]

    mid = tmp_path / "ds" / "checkpoints" / "step-000003"          # past the warm-up, mid-decay
    finish(torchrun(tmp_path / "resumed", *RUN, "deepspeed.stage=2", f"train.resume={mid}", nproc=1))
    resumed = logged_rows(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5]
    for s in (4, 5):
        for key in ("lr", "loss", "losses", "grad_norm"):
            assert resumed[s][key] == ds[s][key], f"step {s} {key}"
