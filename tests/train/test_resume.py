"""Stopping and resuming gives the same next losses as not stopping."""
import pytest

from dopsd_fast.testing import tiny_trainer


# adamw8bit: torchao's 8-bit moments (tests/train/test_optim8bit.py), on adapters of 64 x 64 = 4096 values (rank 64
# at the tiny width), the smallest tensors it quantises
@pytest.mark.parametrize("mode", ["lora", "full", "lora-adamw8bit"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, mode):
    if mode == "lora-adamw8bit":
        pytest.importorskip("torchao")
    extra = ["optim.name=adamw8bit", "adapter.rank=64"] if mode == "lora-adamw8bit" else []
    common = [f"adapter.mode={mode.partition('-')[0]}", "train.checkpoint_every=3", "train.batch_size=2",
              "data.num_pairs=3", "optim.warmup_steps=4", *extra]   # odd batches across epoch ends, warm-up crossing the stop
    straight = tiny_trainer(tmp_path / "a", "train.steps=6", *common).train()

    tiny_trainer(tmp_path / "b", "train.steps=3", *common).train()
    resumed = tiny_trainer(tmp_path / "b", "train.steps=6", "train.resume=auto", *common)
    rest = resumed.train()
    assert resumed.step == 6 and len(rest) == 3
    assert [r.losses for r in rest] == [r.losses for r in straight[3:]]   # bit-exact on CPU


def test_resume_on_an_image_folder_with_workers_reproduces_the_losses(tmp_path):
    """Folder data decoded by 2 DataLoader workers that run ahead of training: stopped after a step and resumed,
    the next losses are those of a run without workers that never stopped (same batches, same order)."""
    from dopsd_fast.testing import image_folder

    data = image_folder(tmp_path / "data", n=5)
    common = ["data.kind=folder", f"data.path={data}", "data.buckets=1", "data.cache_dir=null", "train.batch_size=2",
              "train.checkpoint_every=1"]
    straight = tiny_trainer(tmp_path / "a", "train.steps=3", "data.num_workers=0", *common).train()
    tiny_trainer(tmp_path / "b", "train.steps=1", "data.num_workers=2", *common).train()
    resumed = tiny_trainer(tmp_path / "b", "train.steps=3", "train.resume=auto", "data.num_workers=2", *common)
    assert [r.losses for r in resumed.train()] == [r.losses for r in straight[1:]]
