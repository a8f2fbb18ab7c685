"""Atomic safetensors checkpoints: layout, pruning, crash leftovers, corrupt files, optimizer state."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dopsd_fast.train.checkpoint as ckpt
from dopsd_fast.cli import main
from dopsd_fast.train.config import Config, load_config
from dopsd_fast.train.run_dir import LOCK_NAME
from dopsd_fast.train.checkpoint import (CheckpointError, list_checkpoints, load_optimizer, load_tensors,
                                         optimizer_tensors, read_state, save_checkpoint)


def parts_for(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "student": {"a.lora_A": torch.full((2, 3), value), "a.lora_B": torch.full((3, 2), -value)},
        "teacher": {"a.lora_A": torch.full((2, 3), value / 2)},
        "rng": {"noise": torch.arange(5, dtype=torch.uint8)},
    }


def steps_of(root: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(root)]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file below ``folder`` but the lock, where each run that takes it writes its pid
    (train/run_dir.py)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


# ---------------------------------------------------------------- save / list

def test_save_and_list_round_trip(tmp_path):
    root = tmp_path / "checkpoints"
    assert list_checkpoints(root) == []                       # no folder yet
    state = {"step": 5, "data": {"epoch": 0}, "note": "x"}
    path = save_checkpoint(root, 5, parts_for(1.0), state, keep_last=3)
    assert path == root / "step-000005"
    assert sorted(p.name for p in path.iterdir()) == ["rng.safetensors", "state.json", "student.safetensors",
                                                      "teacher.safetensors"]
    assert list_checkpoints(root) == [path]
    assert read_state(path) == state
    for name, tensors in parts_for(1.0).items():
        loaded = load_tensors(path / f"{name}.safetensors", tensors)
        assert loaded.keys() == tensors.keys()
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype


def test_save_non_contiguous_and_grad_tensors(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 4))
    parts = {"student": {"w": p, "wt": p.t()}}                 # requires grad; a transposed view
    path = save_checkpoint(tmp_path, 1, parts, {"step": 1}, keep_last=1)
    loaded = load_file(str(path / "student.safetensors"))
    assert torch.equal(loaded["w"], p.detach()) and torch.equal(loaded["wt"], p.detach().t())


def test_list_is_numeric_oldest_first(tmp_path):
    for step in (10, 2, 1_000_000, 999_999):
        save_checkpoint(tmp_path, step, parts_for(float(step)), {"step": step}, keep_last=10)
    assert steps_of(tmp_path) == [2, 10, 999_999, 1_000_000]


def test_keep_last_deletes_only_oldest_complete(tmp_path):
    root = tmp_path
    # Leftovers that are not complete checkpoints: a crash mid-write (cleared by the next save, since it can
    # never complete), a folder without state.json and a user's backup copy (pruning leaves both alone).
    crashed = root / "step-000009.tmp"
    crashed.mkdir(parents=True)
    (crashed / "student.safetensors").write_bytes(b"partial")
    (crashed / "state.json").write_text(json.dumps({"step": 9}))
    incomplete = root / "step-000000"
    incomplete.mkdir()
    backup = root / "step-000001-backup"
    backup.mkdir()
    (backup / "state.json").write_text(json.dumps({"step": 1}))

    for step in range(1, 6):
        save_checkpoint(root, step, parts_for(float(step)), {"step": step}, keep_last=2)
        assert steps_of(root) == list(range(max(1, step - 1), step + 1))
    assert sorted(p.name for p in root.iterdir()) == ["step-000000", "step-000001-backup", "step-000004",
                                                      "step-000005"]
    # The survivors are the newest two, with their own contents.
    assert torch.equal(load_tensors(root / "step-000005" / "student.safetensors")["a.lora_A"], torch.full((2, 3), 5.0))


def test_list_ignores_odd_names(tmp_path):
    (tmp_path / "step-best").mkdir()
    (tmp_path / "step-best" / "state.json").write_text("{}")
    (tmp_path / "step-000003").write_text("a file, not a folder")
    (tmp_path / "step-000004.old").mkdir()
    (tmp_path / "step-000004.old" / "state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == []
    save_checkpoint(tmp_path, 7, parts_for(7.0), {"step": 7}, keep_last=1)
    assert steps_of(tmp_path) == [7]
    assert (tmp_path / "step-best").is_dir() and (tmp_path / "step-000004.old").is_dir()


def test_resave_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, parts_for(1.0), {"step": 3, "v": 1}, keep_last=3)
    save_checkpoint(tmp_path, 3, {"student": {"only": torch.ones(1)}}, {"step": 3, "v": 2}, keep_last=3)
    path = tmp_path / "step-000003"
    assert list_checkpoints(tmp_path) == [path]
    assert read_state(path)["v"] == 2
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "student.safetensors"]   # no stale files
    assert list(load_tensors(path / "student.safetensors")) == ["only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]                     # no .tmp / .old left


def test_crash_while_resaving_leaves_the_old_copy(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, parts_for(1.0), {"step": 3, "v": 1}, keep_last=3)
    before = snapshot(tmp_path / "step-000003")

    real_save_file = ckpt.save_file
    calls = []

    def crash_on_second_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_file)
    with pytest.raises(CheckpointError, match="step-000003: not written: disk full"):
        save_checkpoint(tmp_path, 3, parts_for(2.0), {"step": 3, "v": 2}, keep_last=3)
    # The complete checkpoint is untouched; the half-written .tmp copy is removed.
    assert snapshot(tmp_path / "step-000003") == before
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000003"]
    assert not (tmp_path / "step-000003.tmp").exists()

    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    save_checkpoint(tmp_path, 3, parts_for(2.0), {"step": 3, "v": 2}, keep_last=3)
    assert read_state(tmp_path / "step-000003")["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]


# ---------------------------------------------------------------- load_tensors / read_state errors

@pytest.mark.parametrize("content", [os.urandom(256), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"],
                         ids=["random", "empty", "bad-header"])
def test_load_tensors_corrupt_file(tmp_path, content):
    path = tmp_path / "student.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_tensors(path)
    assert str(path) in str(e.value) and "not a readable safetensors file" in str(e.value)


def test_load_tensors_truncated_file(tmp_path):
    path = tmp_path / "student.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        load_tensors(path)
    assert str(path) in str(e.value)


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing") as e:
        load_tensors(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(e.value)


def test_load_tensors_key_and_shape_mismatch(tmp_path):
    path = tmp_path / "student.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4), "extra": torch.zeros(1)}, str(path))
    expected = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "gone": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_tensors(path, expected)
    msg = str(e.value)
    assert str(path) in msg
    assert "1 missing (e.g. gone)" in msg
    assert "1 unexpected (e.g. extra)" in msg
    assert "1 mis-shaped (e.g. a: file (2, 3) vs model (3, 2))" in msg
    # With the file's own keys and shapes it loads.
    assert set(load_tensors(path, {"a": torch.zeros(2, 3), "b": torch.ones(4), "extra": torch.ones(1)})) == {"a", "b", "extra"}


def test_read_state_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no state.json") as e:
        read_state(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", [b'{"step": 3', b"\xff\xfe\x00garbage", b"[1, 2]", b""],
                         ids=["truncated-json", "binary", "not-an-object", "empty"])
def test_read_state_corrupt(tmp_path, content):
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        read_state(tmp_path)
    assert str(tmp_path / "state.json") in str(e.value)


# ---------------------------------------------------------------- optimizer state

def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    return model, names, opt


def _train_steps(model, opt, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(5, 4, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_optimizer_round_trip(tmp_path):
    model, names, opt = _model_and_optimizer(0)
    _train_steps(model, opt, 3, seed=1)
    tensors, groups = optimizer_tensors(opt, names)
    assert set(tensors) == {f"{n}::{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}

    # Through the real on-disk formats: safetensors for the moments, JSON for the groups.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "optimizer.safetensors"))
    groups = json.loads(json.dumps(groups))

    model2, names2, opt2 = _model_and_optimizer(0)
    opt2.param_groups[0]["lr"] = 123.0                   # overwritten by the saved groups
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model.parameters()):
            p.copy_(q)
    load_optimizer(opt2, names2, load_tensors(tmp_path / "optimizer.safetensors"), groups)

    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        assert sd["state"][i].keys() == sd2["state"][i].keys()
        for k in sd["state"][i]:
            a, b = sd["state"][i][k], sd2["state"][i][k]
            assert a.dtype == b.dtype and torch.equal(a, b), (i, k)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)

    # The restored optimizer continues exactly like the original one.
    _train_steps(model, opt, 2, seed=2)
    _train_steps(model2, opt2, 2, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_load_optimizer_unknown_parameter_name():
    model, names, opt = _model_and_optimizer(0)
    _train_steps(model, opt, 1, seed=1)
    tensors, groups = optimizer_tensors(opt, names)
    renamed = [n.replace("0.", "first.") for n in names]
    _, _, opt2 = _model_and_optimizer(0)
    with pytest.raises(CheckpointError, match="'0.weight'"):
        load_optimizer(opt2, renamed, tensors, groups)


# ---------------------------------------------------------------- resume through `dopsd train`

def _train(out: Path, steps: int, *extra: str) -> int:
    return main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}",
                 "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=1", "--set", "train.resume=auto",
                 *extra])


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert _train(out, 1) == 0
    return out


@pytest.fixture
def run(one_step_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    return out


def test_resume_ignores_tmp_leftover(run, capsys):
    # A crash while writing step 9 left a complete-looking folder that was never renamed into place.
    step1 = run / "checkpoints" / "step-000001"
    crashed = run / "checkpoints" / "step-000009.tmp"
    shutil.copytree(step1, crashed)
    (crashed / "state.json").write_text(json.dumps({**read_state(step1), "step": 9}))
    capsys.readouterr()

    assert _train(run, 2) == 0
    out = capsys.readouterr().out
    assert f"resumed from {step1} at step 1" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert steps_of(run / "checkpoints") == [1, 2]
    assert read_state(run / "checkpoints" / "step-000002")["step"] == 2


@pytest.mark.parametrize("victim", ["student.safetensors", "teacher.safetensors", "optimizer.safetensors",
                                    "rng.safetensors"])
def test_resume_from_corrupt_checkpoint_fails_cleanly(run, capsys, victim):
    bad = run / "checkpoints" / "step-000001" / victim
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])         # truncated mid-write
    before = snapshot(run)
    capsys.readouterr()

    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert err.startswith("dopsd: error:") and str(bad) in err and "Traceback" not in err
    assert snapshot(run) == before                                        # nothing written, nothing removed


def test_resume_from_random_bytes_student(run, capsys):
    bad = run / "checkpoints" / "step-000001" / "student.safetensors"
    bad.write_bytes(os.urandom(bad.stat().st_size))
    before = snapshot(run)
    assert _train(run, 2) == 2
    assert str(bad) in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_from_mismatched_student_names_keys(run, capsys):
    path = run / "checkpoints" / "step-000001" / "student.safetensors"
    tensors = load_file(str(path))
    first, second = sorted(tensors)[:2]
    tensors["not.a.parameter"] = tensors.pop(first)
    tensors[second] = torch.zeros(1)
    save_file(tensors, str(path))
    before = snapshot(run)

    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert f"1 missing (e.g. {first})" in err and "1 unexpected (e.g. not.a.parameter)" in err
    assert f"1 mis-shaped (e.g. {second}: file (1,)" in err
    assert snapshot(run) == before


def test_resume_from_corrupt_state_json(run, capsys):
    state = run / "checkpoints" / "step-000001" / "state.json"
    state.write_text('{"step": 1, "da')
    before = snapshot(run)
    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert "dopsd: error:" in err and str(state) in err
    assert snapshot(run) == before


def test_resume_from_explicit_missing_path(run, capsys, tmp_path):
    missing = tmp_path / "nowhere" / "step-000005"
    before = snapshot(run)
    assert _train(run, 2, "--set", f"train.resume={json.dumps(str(missing))}") == 2
    assert str(missing) in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_from_state_json_without_required_keys(run, capsys):
    state = run / "checkpoints" / "step-000001" / "state.json"
    content = json.loads(state.read_text())
    del content["data"]
    state.write_text(json.dumps(content))
    before = snapshot(run)
    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert str(state) in err and "lacks data" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("changes, named", [
    (["adapter.mode=full"], ['adapter.mode: "lora" -> "full"']),
    (["method.objective=sft"], ['method.objective: "dopsd" -> "sft"']),
    (["method.loss=velocity", "optim.lr=1e-3"], ['method.loss: "x0" -> "velocity"', "optim.lr: 0.002 -> 0.001"]),
    (["data.num_pairs=2", "model.arch.n_layers=1"], ["data.num_pairs: 4 -> 2", "model.arch.n_layers: 2 -> 1"]),
])
def test_resume_of_another_experiment_is_refused_naming_the_keys(run, capsys, changes, named):
    before = snapshot(run)
    capsys.readouterr()
    assert _train(run, 2, *[a for c in changes for a in ("--set", c)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: {run / 'checkpoints' / 'step-000001'}: written by another experiment")
    assert all(n in err for n in named), err
    assert "train.steps" not in err                                    # allowed, so not among the refused
    assert "--set train.output_dir=NEW_DIR" in err and "--set train.resume=null" in err
    assert snapshot(run) == before


def test_resume_that_extends_the_run_says_what_changed(run, capsys):
    capsys.readouterr()
    assert _train(run, 2, "--set", "train.log_every=2", "--set", "train.keep_last=5") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resumed from"))
    assert line.startswith(f"resumed from {run / 'checkpoints' / 'step-000001'} at step 1; changed since: ")
    assert "train.steps: 1 -> 2" in line and "train.log_every: 10 -> 2" in line and "train.keep_last: 3 -> 5" in line
    assert "nothing left" not in line
    assert steps_of(run / "checkpoints") == [1, 2]


def test_a_checkpoint_with_a_retired_key_resumes(run, capsys):
    """method.packed_forward (removed) only said how a run executed: a checkpoint that names it resumes."""
    step1 = run / "checkpoints" / "step-000001"
    state = read_state(step1)
    state["config"]["method"]["packed_forward"] = True
    (step1 / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert _train(run, 2) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resumed from"))
    assert line.startswith(f"resumed from {step1} at step 1; changed since: train.output_dir: ")   # the copied run
    assert line.endswith(", train.steps: 1 -> 2") and "packed_forward" not in line
    assert steps_of(run / "checkpoints") == [1, 2]


def test_resume_of_a_finished_run_says_nothing_is_left(run, capsys):
    capsys.readouterr()
    metrics = (run / "metrics.jsonl").read_text()
    assert _train(run, 1) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step-000001'} at step 1" in out
    assert "nothing left to train (train.steps=1): raise train.steps to train on" in out
    assert (run / "metrics.jsonl").read_text() == metrics and steps_of(run / "checkpoints") == [1]


def test_every_resumable_key_is_a_config_key():
    keys = ckpt._flat(Config().to_dict())
    for name in ckpt.RESUMABLE:
        assert any(k == name or k.startswith(name + ".") for k in keys), f"RESUMABLE names {name!r}: no such key"


def test_a_key_the_checkpoint_predates_takes_its_default(tmp_path):
    cfg = load_config("tiny-cpu")
    saved = cfg.to_dict()
    del saved["validation"], saved["train"]["memory_budget_gb"]      # written before these keys existed
    assert ckpt.resume_changes(tmp_path, saved, cfg) == []
    saved["method"]["objective"] = "sft"
    with pytest.raises(CheckpointError, match='method.objective: "sft" -> "dopsd"'):
        ckpt.resume_changes(tmp_path, saved, cfg)


# ---------------------------------------------------------------- hand-edited or foreign checkpoints, a full disk

@pytest.mark.parametrize("edit, named", [
    (lambda s: s.update(step="abc"), 'step is "abc", expected an integer >= 0'),
    (lambda s: s.update(step=-1), "step is -1, expected an integer >= 0"),
    (lambda s: s.update(step=1.5), "step is 1.5, expected an integer >= 0"),
    (lambda s: s.update(data=[1]), "data is [1], expected a mapping"),
    (lambda s: s["data"].update(epoch="0"), 'data.epoch is "0", expected an integer >= 0'),
    (lambda s: s["data"].pop("position"), "lacks data.position"),
    (lambda s: s.update(param_groups={"lr": 1}), 'param_groups is {"lr": 1}, expected a list of mappings'),
    (lambda s: s.update(config="tiny-cpu"), 'config is "tiny-cpu", expected a mapping'),
    (lambda s: s["param_groups"][0].update(lr="fast"), 'param_groups[0].lr is "fast", but this run\'s optimizer holds'),
    (lambda s: s["param_groups"][0].update(betas=[0.9]), "param_groups[0].betas is [0.9]"),
    (lambda s: s["param_groups"][0].update(amsgrad="no"), 'param_groups[0].amsgrad is "no"'),
], ids=["step-str", "step-negative", "step-float", "data-list", "epoch-str", "no-position", "groups-dict", "config-str",
        "lr-str", "betas-short", "amsgrad-str"])
def test_state_json_with_wrong_types_names_the_key(run, capsys, edit, named):
    path = run / "checkpoints" / "step-000001" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    before = snapshot(run)
    capsys.readouterr()
    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: {path}: ") and named in err and "Traceback" not in err, err
    assert "resume from" in err
    assert snapshot(run) == before                                      # config.yaml included: not rewritten


def _edit_optimizer(run: Path, edit) -> Path:
    path = run / "checkpoints" / "step-000001" / "optimizer.safetensors"
    tensors = load_file(str(path))
    edit(tensors, sorted({k.rpartition("::")[0] for k in tensors})[0])
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("edit, named", [
    (lambda t, p: t.__setitem__(f"{p}::exp_avg", torch.zeros(1)), "::exp_avg has shape (1,), the parameter needs"),
    (lambda t, p: t.__setitem__(f"{p}::exp_avg_sq", t[f"{p}::exp_avg_sq"].t().contiguous()), "::exp_avg_sq has shape"),
    (lambda t, p: t.pop(f"{p}::exp_avg_sq"), "::exp_avg_sq is missing"),
    (lambda t, p: t.__setitem__(f"{p}::step", torch.ones(3)), "::step has shape (3,), the parameter needs ()"),
    (lambda t, p: t.__setitem__(f"{p}::exp_avg", t[f"{p}::exp_avg"].to(torch.int32)), "::exp_avg is torch.int32"),
], ids=["exp_avg-shape", "exp_avg_sq-transposed", "exp_avg_sq-missing", "step-shape", "exp_avg-int"])
def test_optimizer_tensors_of_the_wrong_shape_or_missing_are_refused_at_load(run, capsys, edit, named):
    """Without the check they load and the run fails at its first step, after rewriting config.yaml."""
    path = _edit_optimizer(run, edit)
    before = snapshot(run)
    capsys.readouterr()
    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dopsd: error: {path}: ") and named in err and "Traceback" not in err, err
    assert snapshot(run) == before


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_ones(run, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError (not an OSError): the message names the checkpoint, the
    half-written .tmp goes, the checkpoints already complete stay."""
    from safetensors import SafetensorError

    step1 = snapshot(run / "checkpoints" / "step-000001")

    def full_disk(tensors, filename, *args, **kwargs):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{filename}"')

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    capsys.readouterr()
    assert _train(run, 2) == 2
    err = capsys.readouterr().err
    step2 = run / "checkpoints" / "step-000002"
    assert err.startswith(f"dopsd: error: {step2}: not written: ") and "No space left on device" in err
    assert "the disk is full; free space there or set train.output_dir on another disk" in err
    assert f"the complete checkpoints in {run / 'checkpoints'} are kept" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]      # no .tmp left
    assert snapshot(run / "checkpoints" / "step-000001") == step1


def test_a_read_only_checkpoint_folder_is_named(tmp_path, monkeypatch):
    import errno

    save_checkpoint(tmp_path, 1, parts_for(1.0), {"step": 1}, keep_last=3)

    def read_only(tensors, filename, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", filename)

    monkeypatch.setattr(ckpt, "save_file", read_only)
    with pytest.raises(CheckpointError, match="step-000002: not written: Read-only file system: the folder is not "
                                              "writable; fix its permissions or set train.output_dir elsewhere"):
        save_checkpoint(tmp_path, 2, parts_for(2.0), {"step": 2}, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
