"""Stopping and resuming gives the same next losses as not stopping."""
import pytest

from dopsd_fast.testing import tiny_trainer


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, mode):
    common = [f"adapter.mode={mode}", "train.checkpoint_every=3", "train.batch_size=2", "data.num_pairs=3",
              "optim.warmup_steps=4"]   # odd batches across epoch ends, warm-up crossing the stop
    straight = tiny_trainer(tmp_path / "a", "train.steps=6", *common).train()

    tiny_trainer(tmp_path / "b", "train.steps=3", *common).train()
    resumed = tiny_trainer(tmp_path / "b", "train.steps=6", "train.resume=auto", *common)
    rest = resumed.train()
    assert resumed.step == 6 and len(rest) == 3
    assert [r.losses for r in rest] == [r.losses for r in straight[3:]]   # bit-exact on CPU
