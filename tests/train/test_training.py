"""End-to-end behaviour of `dopsd train` on the embedded default."""
import json
import math

import pytest

import torch

from dopsd_fast.testing import tiny_trainer


def test_dopsd_loss_falls_over_50_iterations(tmp_path):
    tr = tiny_trainer(tmp_path, "train.steps=50", "train.checkpoint_every=1000")
    losses = [r.loss for r in tr.train()]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.5 * first, f"D-OPSD loss did not fall: first-10 mean {first:.3g}, last-10 mean {last:.3g}"


def test_ema_teacher_follows_student(tmp_path):
    tr = tiny_trainer(tmp_path, "train.steps=3", "train.checkpoint_every=1000")
    teacher0 = [t.clone() for t in tr.roles.ema.teacher]
    results = tr.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["model_tflop"] for r in rows] == pytest.approx([r.flops / 1e12 for r in results])
    assert all(r["model_tflop"] > 0 and r["images_per_s"] > 0 for r in rows)
    moved = sum((t - t0).abs().sum().item() for t, t0 in zip(tr.roles.ema.teacher, teacher0))
    assert moved > 0
    # after the step the teacher sits between its start and the student (decay 0.99 -> 1% of the way per step)
    for t, s in zip(tr.roles.ema.teacher, tr.roles.trainable.values()):
        assert (t - s).norm() <= (s.detach()).norm() + 1e-12


def test_full_mode_and_sft_objective_run(tmp_path):
    full = tiny_trainer(tmp_path / "full", "adapter.mode=full", "train.steps=2", "optim.lr=1e-4")
    assert [math.isfinite(r.loss) for r in full.train()] == [True, True]
    sft = tiny_trainer(tmp_path / "sft", "method.objective=sft", "train.steps=2")
    out = sft.train()
    assert all(math.isfinite(r.loss) and len(r.losses) == 1 for r in out)


def test_lora_adapters_start_as_the_exact_base(tmp_path):
    tr = tiny_trainer(tmp_path)
    x = [torch.randn(3, 1, 32, 32)]
    t = torch.tensor([0.3])
    feats = tr.text_encoder(["a red circle"])
    from dopsd_fast.nn.lora_linear import set_active_adapter
    outs = {}
    for name in ("student", "teacher", None):
        set_active_adapter(tr.model, name)
        outs[name] = tr.model(x, t, cap_feats=feats)[0]
    torch.testing.assert_close(outs["student"], outs[None], rtol=0, atol=0)
    torch.testing.assert_close(outs["teacher"], outs[None], rtol=0, atol=0)
