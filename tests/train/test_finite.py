"""NaN/Inf: bad steps update nothing and end a diverged run (exit 3); checkpoints, exports and loads never carry a
non-finite tensor; metrics.jsonl stays strict JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.cli import main
from dopsd_fast.models.export import save_comfyui_lora, save_diffusers_lora, save_full_weights
from dopsd_fast.models.loading import WeightsError, first_nonfinite
from dopsd_fast.testing import randomize_adapters, tiny_trainer
from dopsd_fast.train.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from dopsd_fast.train.finite import EXIT_DIVERGED, BadSteps, TrainingDiverged, strict_row

FAST = ["--set", "train.report_to=[jsonl]", "--set", "train.checkpoint_every=1"]


def train(out: Path, *sets: str) -> int:
    args = ["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}", *FAST]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_rows(out: Path) -> list[dict]:
    """metrics.jsonl as a strict JSON parser reads it: NaN / Infinity tokens are an error."""
    return [json.loads(line, parse_constant=_no_constants) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_all_checkpoints_finite(root: Path) -> None:
    for ckpt in list_checkpoints(root):
        for f in ckpt.glob("*.safetensors"):
            assert first_nonfinite(load_file(str(f))) is None, f


# ---------------------------------------------------------------- the training loop

def test_lr_1e30_skips_bad_steps_then_stops_with_exit_3(tmp_path, capsys):
    """Step 1's update blows the weights up (finite, ~1e30); from step 2 on every loss is NaN: steps 2-4 update
    nothing, the run stops after train.max_bad_steps=3 of them in a row, before step 4's checkpoint."""
    out = tmp_path / "run"
    assert train(out, "train.steps=10", "optim.lr=1e30", "train.keep_last=10") == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "steps 2-4: 3 steps in a row had a non-finite loss" in err and "optim.lr=1e+30" in err
    assert "Traceback" not in err

    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert [r["bad_steps"] for r in rows] == [0, 1, 2, 3]
    assert "nonfinite" not in rows[0] and math.isfinite(rows[0]["loss"])
    for r in rows[1:]:
        assert r["loss"] is None and r["nonfinite"][:2] == ["loss", "losses"]

    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    assert_all_checkpoints_finite(root)
    # skipped steps changed no weight, EMA teacher or AdamW moment: steps 2 and 3 hold step 1's tensors
    for part in ("student", "teacher", "optimizer"):
        first, last = (load_file(str(root / s / f"{part}.safetensors")) for s in ("step-000001", "step-000003"))
        assert all(torch.equal(first[k], last[k]) for k in first), part
    state = json.loads((root / "step-000003" / "state.json").read_text())
    assert state["bad_steps"] == {"total": 2, "streak": 2}


def test_bad_step_count_survives_a_resume(tmp_path, capsys):
    """A run that ends inside a streak (2 bad steps < 3) exits 0; its resume counts on and stops at step 4."""
    out = tmp_path / "run"
    assert train(out, "train.steps=3", "optim.lr=1e30") == 0
    assert [r["skipped"] for r in strict_rows(out)] == [False, True, True]
    assert train(out, "train.steps=6", "optim.lr=1e30") == EXIT_DIVERGED
    assert "steps 2-4: 3 steps in a row" in capsys.readouterr().err
    assert [(r["step"], r["bad_steps"]) for r in strict_rows(out)][-1] == (4, 3)
    assert list_checkpoints(out / "checkpoints")[-1].name == "step-000003"
    # a resume may raise the limit (train.max_bad_steps is RESUMABLE): on to step 5, then 5 in a row
    assert train(out, "train.steps=6", "optim.lr=1e30", "train.max_bad_steps=5") == EXIT_DIVERGED
    assert "steps 2-6: 5 steps in a row" in capsys.readouterr().err


def test_non_finite_grad_norm_alone_skips_the_update(tmp_path):
    """A finite loss with a NaN gradient: no AdamW step, no EMA update, gradients dropped, counted as bad."""
    tr = tiny_trainer(tmp_path, "train.steps=3")
    randomize_adapters(tr)
    tr.forward_backward_step(next(tr.stream))
    tr.optimizer_step()                                # builds AdamW's state
    before = {k: p.detach().clone() for k, p in tr.roles.trainable.items()}
    teacher = [t.clone() for t in tr.roles.ema.teacher]
    moments = lambda: [v.clone() for s in tr.optimizer.state.values() for v in s.values()]
    moments_before = moments()
    tr.forward_backward_step(next(tr.stream))
    next(iter(tr.roles.trainable.values())).grad.view(-1)[0] = float("nan")
    norm = tr.optimizer_step(loss=0.5)
    assert math.isnan(norm) and tr.bad_steps.skipped and tr.bad_steps.fields() == {"skipped": True, "bad_steps": 1}
    assert all(torch.equal(p, before[k]) for k, p in tr.roles.trainable.items())
    assert all(torch.equal(t, t0) for t, t0 in zip(tr.roles.ema.teacher, teacher))
    assert all(torch.equal(a, b) for a, b in zip(moments(), moments_before, strict=True))    # and no step count
    assert all(p.grad is None for p in tr.roles.trainable.values())
    tr.forward_backward_step(next(tr.stream))          # a good step after it ends the streak, not the count
    assert math.isfinite(tr.optimizer_step(loss=0.5)) and (tr.bad_steps.streak, tr.bad_steps.total) == (0, 1)


def test_bad_steps_counts_in_a_row():
    bad = BadSteps(limit=2)
    assert bad.check(1.0, 0.5) and bad.check(1.0, None)          # None: a norm DeepSpeed does not report
    assert not bad.check(float("nan"), 0.5)
    bad.raise_if_diverged(3, 1e-4)
    assert bad.check(1.0, 0.5)
    assert not bad.check(1.0, float("inf")) and not bad.check(float("inf"), float("nan"))
    with pytest.raises(TrainingDiverged, match="steps 5-6: 2 steps in a row .* resume from an earlier checkpoint"):
        bad.raise_if_diverged(6, 1e-4)
    restored = BadSteps(limit=2)
    restored.load_state_dict(bad.state_dict())
    assert (restored.total, restored.streak) == (3, 2)
    restored.load_state_dict(None)                              # a checkpoint of an older version
    assert (restored.total, restored.streak) == (0, 0)
    for edited in ({"total": "3", "streak": 2}, {"total": 1, "streak": 2}, [3, 2]):
        with pytest.raises(CheckpointError, match="state.json: bad_steps is .*resume from an earlier checkpoint"):
            restored.load_state_dict(edited, "state.json")
    first_step_bad = BadSteps(limit=1)
    first_step_bad.check(float("nan"), None)
    with pytest.raises(TrainingDiverged, match="step 1: 1 steps in a row .* start over .*: no step of this run updated"):
        first_step_bad.raise_if_diverged(1, 1e-4)


def test_strict_row():
    row = {"step": 2, "loss": float("nan"), "losses": [0.5, float("inf")], "grad_norm": None, "ok": 1.0}
    out = strict_row(row)
    assert out == {"step": 2, "loss": None, "losses": [0.5, None], "grad_norm": None, "ok": 1.0,
                   "nonfinite": ["loss", "losses"]}
    json.dumps(out, allow_nan=False)
    assert strict_row({"step": 1, "loss": 0.5}) == {"step": 1, "loss": 0.5}       # no flag when all finite


# ---------------------------------------------------------------- loads: never train on from NaN

def test_nan_in_a_pretrained_weight_exits_2_naming_file_and_tensor(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from test_pretrained import PIXEL_TINY      # same folder: the tiny pixel-space diffusers model

    folder = tmp_path / "transformer"
    ZImageTransformer2DModel(**PIXEL_TINY).save_pretrained(folder)
    path, key = folder / "diffusion_pytorch_model.safetensors", "layers.0.attention.to_k.weight"
    tensors = load_file(str(path))
    tensors[key][2, 3] = float("nan")
    save_file(tensors, str(path))
    assert train(tmp_path / "run", "train.steps=1", "model.arch={}", f"model.pretrained={json.dumps(str(folder))}") == 2
    err = capsys.readouterr().err
    assert f"{path}: tensor '{key}' holds NaN or Inf" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- checkpoints: never write, never read NaN

def test_resume_refuses_a_nan_in_the_student_naming_the_tensor(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "train.steps=2") == 0
    ckpt = out / "checkpoints" / "step-000002"
    student = load_file(str(ckpt / "student.safetensors"))
    key = sorted(student)[3]
    student[key].view(-1)[1] = float("nan")
    save_file(student, str(ckpt / "student.safetensors"))
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    assert train(out, "train.steps=4") == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'student.safetensors'}: tensor {key!r} holds NaN or Inf" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == files       # the checkpoint is left as it was
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]


def test_save_refuses_a_non_finite_tensor_and_keeps_the_previous_checkpoints(tmp_path):
    good = {"student": {"w": torch.ones(3)}, "rng": {"noise": torch.arange(4, dtype=torch.uint8)}}
    save_checkpoint(tmp_path, 1, good, {"step": 1}, keep_last=1)
    bad = {"student": {"w": torch.ones(3)}, "teacher": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(CheckpointError, match=r"step-000002: not written: teacher tensor 'b' holds NaN or Inf"):
        save_checkpoint(tmp_path, 2, bad, {"step": 2}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]     # no .tmp, step 1 not pruned


def test_exports_refuse_a_nan_weight(tmp_path):
    tr = tiny_trainer(tmp_path / "run")
    key, p = next(iter(tr.roles.trainable.items()))
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    for export, dest in ((save_diffusers_lora, tmp_path / "diffusers"),
                         (save_comfyui_lora, tmp_path / "comfy" / "lora.safetensors"),
                         (lambda m, d: save_full_weights(m, d, "student"), tmp_path / "full")):
        with pytest.raises(WeightsError, match="not written: tensor .* holds NaN or Inf"):
            export(tr.model, dest)
        assert not dest.exists()
