"""A LoRA run writes its student's LoRA where users look for it (every checkpoint, and output_dir at the end), the
same bytes `dopsd export` writes; adapter.init_from starts a fresh run's student and EMA teacher from such a file
(diffusers or ComfyUI names); bad sources end `dopsd train` with exit 2 naming the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd_fast.cli import main
from dopsd_fast.models.export import COMFYUI_FILE, LORA_FILE
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.trainer import make_trainer

FAST = ["--set", "train.report_to=[jsonl]", "--set", "train.checkpoint_every=1", "--set", "train.resume=null"]


def train(out: Path, *sets: str) -> int:
    args = ["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}", *FAST]
    for s in sets:
        args += ["--set", s]
    return main(args)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_file(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = read(a), read(b)
    assert ma == mb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """tiny-cpu, 3 steps, a checkpoint each step, both LoRA formats."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with use_backend("reference"):      # a module fixture runs outside conftest's per-test reference ops
        assert train(out, "train.steps=3", "train.export_formats=[diffusers, comfyui]") == 0
    return out


def test_every_checkpoint_holds_the_lora_dopsd_export_writes(run, tmp_path):
    ckpts = run / "checkpoints"
    for step in (1, 2, 3):
        names = {p.name for p in (ckpts / f"step-{step:06d}").iterdir()}
        assert {LORA_FILE, COMFYUI_FILE} <= names
    step2 = ckpts / "step-000002"
    for fmt, name in (("diffusers", LORA_FILE), ("comfyui", COMFYUI_FILE)):
        assert main(["export", str(run), "--checkpoint", "step-000002", "--format", fmt,
                     "--out", str(tmp_path / fmt)]) == 0
        assert_same_file(step2 / name, tmp_path / fmt / name)
    # the student's adapter (what training produces), not the EMA teacher's
    lora, student = read(step2 / LORA_FILE)[0], load_file(str(step2 / "student.safetensors"))
    assert len(lora) == len(student)
    for k, v in student.items():
        module, leaf, _ = k.rsplit(".", 2)
        assert torch.equal(lora[f"transformer.{module}.{leaf}.weight"], v)
    # the end of the run: the last checkpoint's files also in output_dir, and nothing half-written there
    for name in (LORA_FILE, COMFYUI_FILE):
        assert (run / name).read_bytes() == (ckpts / "step-000003" / name).read_bytes()
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("source", ["folder", "diffusers", "comfyui"])
def test_init_from_starts_student_and_teacher_from_the_lora(run, tmp_path, source):
    step2 = run / "checkpoints" / "step-000002"
    path = {"folder": step2, "diffusers": step2 / LORA_FILE, "comfyui": step2 / COMFYUI_FILE}[source]
    cfg = load_config("tiny-cpu", [f"train.output_dir={json.dumps(str(tmp_path / 'next'))}", "train.resume=null",
                                   f"adapter.init_from={json.dumps(str(path))}"])
    trainer = make_trainer(cfg, progress=False)
    trained = load_file(str(step2 / "student.safetensors"))
    assert trainer.roles.trainable.keys() == trained.keys()
    teacher = trainer.roles.ema.state_dict()
    for k, v in trainer.roles.trainable.items():
        assert torch.equal(v.detach(), trained[k]), k
        assert torch.equal(teacher[k.replace(".student", ".teacher")], trained[k]), k     # EMA fp32 master
        assert torch.equal(trainer.model.get_parameter(k.replace(".student", ".teacher")), trained[k])


def test_init_from_run_trains_and_exports(run, tmp_path):
    """A continued run trains on; `dopsd export` of it needs no init file any more (the checkpoint replaces it)."""
    out = tmp_path / "next"
    assert train(out, "train.steps=1", f"adapter.init_from={json.dumps(str(run / LORA_FILE))}") == 0
    config = (out / "config.yaml").read_text()
    assert f"init_from: {run / LORA_FILE}" in config
    assert main(["export", str(out), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / LORA_FILE).is_file()


@pytest.mark.parametrize("sets, written", [(["train.export_formats=[]"], False), (["adapter.mode=full"], False),
                                           ([], True)])
def test_which_runs_write_a_lora(tmp_path, sets, written):
    """Default [diffusers]: only pytorch_lora_weights.safetensors; [] and full fine-tuning write none."""
    out = tmp_path / "run"
    assert train(out, "train.steps=1", *sets) == 0
    files = {p.name for p in (out / "checkpoints" / "step-000001").iterdir()} | {p.name for p in out.iterdir()}
    assert (LORA_FILE in files) == written and COMFYUI_FILE not in files


@pytest.mark.parametrize("value, message", [
    ("[diffusers, kohya]", "train.export_formats[1]: 'kohya' is not one of 'diffusers', 'comfyui'"),
    ("[comfyui, comfyui]", "train.export_formats: lists a format twice"),
])
def test_export_formats_are_validated(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny-cpu", [f"train.export_formats={value}"])


@pytest.mark.parametrize("case", ["missing", "rank", "full", "corrupt"])
def test_bad_init_from_exits_2_naming_the_file(run, tmp_path, capsys, case):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    source = {"missing": tmp_path / "nope", "rank": run / LORA_FILE, "full": run / LORA_FILE, "corrupt": bad}[case]
    extra = {"rank": ["adapter.rank=4"], "full": ["adapter.mode=full"]}.get(case, [])
    capsys.readouterr()
    assert train(tmp_path / "out", "train.steps=1", f"adapter.init_from={json.dumps(str(source))}", *extra) == 2
    err = capsys.readouterr().err
    expected = {"missing": f"adapter.init_from: {source}: no such file or folder",
                "rank": f"adapter.init_from: {source}: module ",
                "full": "adapter.init_from: starts LoRA adapters, but adapter.mode=full",
                "corrupt": f"adapter.init_from: {source}: not a readable safetensors file"}[case]
    assert err.startswith(f"dopsd: error: {expected}") and "Traceback" not in err
    if case == "rank":
        assert "--set adapter.rank=8 --set adapter.alpha=16" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("name", [LORA_FILE, COMFYUI_FILE])
def test_klein_run_round_trips_through_its_lora_files(tmp_path, name):
    """FLUX.2 [klein]: the checkpoint's ComfyUI file (BFL names, fused double-block qkv) and diffusers file start a
    fresh run's student and teacher at the trained student."""
    out = tmp_path / "run"
    assert main(["train", "tiny-klein-cpu", "--no-progress", "--no-samples", "--set",
                 f"train.output_dir={json.dumps(str(out))}", *FAST, "--set", "train.steps=1",
                 "--set", "train.export_formats=[diffusers, comfyui]"]) == 0
    step1 = out / "checkpoints" / "step-000001"
    cfg = load_config("tiny-klein-cpu", [f"train.output_dir={json.dumps(str(tmp_path / 'next'))}", "train.resume=null",
                                         f"adapter.init_from={json.dumps(str(step1 / name))}"])
    trainer = make_trainer(cfg, progress=False)
    trained = load_file(str(step1 / "student.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)     # trained: B is no longer 0
    teacher = trainer.roles.ema.state_dict()
    for k, v in trainer.roles.trainable.items():
        assert torch.equal(v.detach(), trained[k]), k
        assert torch.equal(teacher[k.replace(".student", ".teacher")], trained[k]), k


def test_a_resume_may_change_the_export_formats(tmp_path):
    """train.export_formats is RESUMABLE: which files a checkpoint gets changes nothing a step computes."""
    out = tmp_path / "run"
    assert train(out, "train.steps=1") == 0
    assert main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}",
                 "--set", "train.report_to=[jsonl]", "--set", "train.steps=2",
                 "--set", "train.export_formats=[diffusers, comfyui]"]) == 0
    assert COMFYUI_FILE not in {p.name for p in (out / "checkpoints" / "step-000001").iterdir()}
    assert {LORA_FILE, COMFYUI_FILE} <= {p.name for p in (out / "checkpoints" / "step-000002").iterdir()}
