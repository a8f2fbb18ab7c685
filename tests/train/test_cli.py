"""`dopsd train` / `dopsd sample`, called in-process (plus one run of the installed console script)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dopsd_fast.cli import main
from dopsd_fast.train.build import resolve_plan
from dopsd_fast.train.config import load_config

# save_grid: every tile is upscaled 4x and padded by 2 pixels.
UPSCALE, PAD = 4, 2


def grid_size(rows: int, cols: int, image_size: int = 32) -> tuple[int, int]:
    tile = image_size * UPSCALE + PAD
    return cols * tile + PAD, rows * tile + PAD      # PIL: (width, height)


def is_labelled_grid(size: tuple[int, int], rows: int, cols: int) -> bool:
    """The tiles plus a left margin for the row labels (at most two tiles wide) and one line of column labels."""
    (w, h), (tw, th) = size, grid_size(rows, cols)
    return tw < w <= tw + 2 * 32 * UPSCALE + 3 * PAD and th < h < th + 20


def out_dir_set(path: Path) -> list[str]:
    return ["--set", f"train.output_dir={json.dumps(str(path))}"]


def train_args(path: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--no-progress", *out_dir_set(path), "--set", f"train.steps={steps}",
            "--set", "train.checkpoint_every=1", *extra]


# ---------------------------------------------------------------- train --dry-run

def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *out_dir_set(out)]) == 0
    stdout = capsys.readouterr().out
    assert "config OK" in stdout.splitlines()[-1]
    plan = yaml.safe_load("\n".join(stdout.splitlines()[:-1]))["plan"]

    expected = resolve_plan(load_config("tiny-cpu"))
    assert plan["model"]["parameters"] == expected.total_params > 0
    assert plan["adapter"]["trainable_parameters"] == expected.trainable_params > 0
    assert plan["adapter"]["trainable_parameters"] < plan["model"]["parameters"]
    assert plan["adapter"]["lora_modules"] == expected.lora_modules
    assert plan["method"]["K"] == 4
    assert plan["method"]["sigmas"] == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert plan["train"]["output_dir"] == str(out)
    assert plan["model"]["arch"]["dim"] == 64
    assert not out.exists()


def test_dry_run_reflects_overrides(tmp_path, capsys):
    assert main(["train", "--dry-run", *out_dir_set(tmp_path / "run"), "--set", "method.sigmas=[1.0, 0.5]",
                 "--set", "adapter.mode=full"]) == 0
    plan = yaml.safe_load("\n".join(capsys.readouterr().out.splitlines()[:-1]))["plan"]
    assert plan["method"]["K"] == 2 and plan["method"]["sigmas"] == [1.0, 0.5, 0.0]
    # Full fine-tuning trains every weight.
    assert plan["adapter"]["trainable_parameters"] == plan["model"]["parameters"]
    assert not (tmp_path / "run").exists()


def test_dry_run_valid_but_unbuildable(tmp_path, capsys):
    assert main(["train", "--dry-run", *out_dir_set(tmp_path / "run"), "--set", "context.kind=qwen3"]) == 0
    assert "cannot train it yet" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("override, key", [("method.lsos=x0", "method.lsos"), ("train.steps=abc", "train.steps")])
def test_bad_key_exit_2_without_traceback(tmp_path, capsys, override, key):
    rc = main(["train", *out_dir_set(tmp_path / "run"), "--set", override])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("dopsd: error:")
    assert key in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_unknown_preset_exit_2(capsys):
    assert main(["train", "no-such-preset", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "dopsd: error:" in err and "no-such-preset" in err and "tiny-cpu" in err


# ---------------------------------------------------------------- train

def test_train_two_steps_writes_run_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, 2, "--no-samples")) == 0
    stdout = capsys.readouterr().out

    header = next(line for line in stdout.splitlines() if "loss_0" in line)
    assert header.split() == ["step", "loss", "loss_0", "loss_1", "loss_2", "loss_3", "grad_norm", "lr", "s/it"]
    assert f"checkpoint: {out / 'checkpoints' / 'step-000002'}" in stdout

    # The run's config is written back and reloads to the same config.
    saved = load_config(str(out / "config.yaml"))
    assert saved.train.steps == 2 and saved.train.output_dir == str(out)
    assert saved.to_dict() == load_config("tiny-cpu", ["train.steps=2", "train.checkpoint_every=1",
                                                       f"train.output_dir={json.dumps(str(out))}"]).to_dict()
    assert (out / "base.safetensors").stat().st_size > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss", "losses", "grad_norm", "lr"} <= set(r)
        assert len(r["losses"]) == 4
        assert r["loss"] == pytest.approx(sum(r["losses"]) / 4)
        assert r["grad_norm"] >= 0 and r["lr"] == pytest.approx(2e-3)

    ckpt = out / "checkpoints" / "step-000002"
    for name in ("student", "teacher", "optimizer", "rng"):
        assert (ckpt / f"{name}.safetensors").stat().st_size > 0
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["config"] == saved.to_dict()
    assert (out / "checkpoints" / "step-000001" / "state.json").is_file()      # checkpoint_every=1
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert not (out / "samples.png").exists()                                  # --no-samples


def test_train_with_samples_writes_png(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, 1, "--set", "data.num_pairs=2", "--set", "sample.steps=2")) == 0
    assert "samples:" in capsys.readouterr().out
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # rows: the 2 data pairs; columns: target | before | after (sampler steps) | after (K steps)
        assert is_labelled_grid(im.size, rows=2, cols=4)
        im.verify()


# ---------------------------------------------------------------- sample

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(out, 1, "--no-samples")) == 0
    return out


def test_sample_after_training(trained_run, tmp_path, capsys):
    png = tmp_path / "x.png"
    assert main(["sample", str(trained_run), "--out", str(png), "--steps", "2", "--prompt", "a red circle"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(trained_run / "checkpoints" / "step-000001")
    assert report["prompts"] == ["a red circle"] and report["steps"] == 2
    assert report["grid"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and is_labelled_grid(im.size, rows=1, cols=1)
        im.verify()


def test_sample_explicit_checkpoint_two_prompts(trained_run, tmp_path, capsys):
    png = tmp_path / "sub" / "y.png"
    ckpt = trained_run / "checkpoints" / "step-000001"
    assert main(["sample", str(trained_run), "--checkpoint", str(ckpt), "--out", str(png), "--steps", "1",
                 "--prompt", "a", "--prompt", "b"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(ckpt)
    with Image.open(png) as im:
        assert is_labelled_grid(im.size, rows=2, cols=1)


def test_sample_checkpoint_by_name(trained_run, tmp_path, capsys):
    assert main(["sample", str(trained_run), "--checkpoint", "step-000001", "--out", str(tmp_path / "x.png"),
                 "--steps", "1", "--prompt", "a"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(trained_run / "checkpoints" / "step-000001")


@pytest.mark.parametrize("name", ["step-999", "step-000999"])
def test_sample_missing_checkpoint_says_it_does_not_exist(trained_run, tmp_path, capsys, name):
    assert main(["sample", str(trained_run), "--checkpoint", name, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: {name}: no such checkpoint directory")
    assert "complete checkpoints there: step-000001" in err and "incomplete" not in err
    assert not (tmp_path / "x.png").exists()


def test_sample_incomplete_checkpoint_says_so(trained_run, tmp_path, capsys):
    half = tmp_path / "step-000002"
    half.mkdir()
    assert main(["sample", str(trained_run), "--checkpoint", str(half), "--out", str(tmp_path / "x.png")]) == 2
    assert "no state.json, so this is not a complete checkpoint directory" in capsys.readouterr().err


def test_sample_without_config_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["sample", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dopsd: error:") and str(tmp_path / "empty" / "config.yaml") in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_sample_without_checkpoints_exit_2(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints")
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "dopsd: error:" in err and "no complete checkpoint" in err


def test_sample_bad_steps_exit_2(trained_run, tmp_path, capsys):
    assert main(["sample", str(trained_run), "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- the installed entry point

def test_console_script_dry_run(tmp_path):
    exe = Path(sys.executable).with_name("dopsd")
    if not exe.exists():
        exe = shutil.which("dopsd")
    assert exe is not None, "the `dopsd` console script is not installed (pip install -e .)"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), "train", "tiny-cpu", "--dry-run", "--set", f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "K: 4" in proc.stdout and "config OK" in proc.stdout
    assert not out.exists()

    proc = subprocess.run([str(exe), "train", "--dry-run", "--set", "method.lsos=1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "dopsd: error:" in proc.stderr and "method.lsos" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- inputs refused before anything is written

def test_empty_config_file_is_refused(tmp_path, capsys):
    """Every default is the 6B Z-Image-Turbo run: an empty file must not plan (or train) it."""
    for text in ("", "# only a comment\n", "{}\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        assert main(["train", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dopsd: error: {path}: empty config") and "tiny-cpu" in err


def test_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ('""', '"  "'):
        assert main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={value}",
                     "--set", "train.steps=1"]) == 2
        assert "train.output_dir: must name a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []                    # nothing written into the current directory


def test_missing_resume_path_creates_nothing(tmp_path, capsys):
    out, missing = tmp_path / "run", tmp_path / "old" / "step-000100"
    assert main(train_args(out, 1, "--no-samples", "--set", f"train.resume={json.dumps(str(missing))}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: train.resume: {missing}: no such checkpoint directory") and "null" in err
    assert not out.exists()


def test_output_dir_below_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    assert main(train_args(out, 1, "--no-samples")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: train.output_dir: {tmp_path / 'file'} is a file, not a folder")
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "the folder is not writable"), (errno.EACCES, "the folder is not writable"),
                                       (errno.ENOSPC, "the disk is full")], ids=["read-only", "forbidden", "full"])
def test_unwritable_output_dir_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, code, fix):
    """The probe file is what meets the read-only or full disk (simulated: root writes through chmod)."""
    import dopsd_fast.train.checkpoint as ckpt

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    out = tmp_path / "run"
    assert main(train_args(out, 1, "--no-samples")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: train.output_dir: cannot write into {tmp_path} ({os.strerror(code)}: {fix}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(train_args(out, 1, "--no-samples")) == 2
        assert f"train.output_dir: cannot write into {out}" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    from dopsd_fast.train.checkpoint import check_writable

    check_writable(tmp_path / "a" / "b")                    # probes tmp_path, creates neither a nor b
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_mid_run_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    """Not only checkpoints (test_checkpoint.py): metrics.jsonl meeting a full disk ends the run with its name."""
    from dopsd_fast.train import metrics

    def full(self, row, show):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(metrics.StepLog, "log", full)
    out = tmp_path / "run"
    assert main(train_args(out, 1, "--no-samples")) == 2
    err = capsys.readouterr().err
    assert f"dopsd: error: {out / 'metrics.jsonl'}: No space left on device: the disk is full" in err
    assert "Traceback" not in err
