"""`dopsd sample` / `dopsd export` build only what they read (train/run_parts.py): the same files as a whole Trainer
loaded from the checkpoint writes, without the data stream, the teacher's context or (export) any encoder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dopsd_fast.cli import main
from dopsd_fast.testing import folder_contents, same_contents
from dopsd_fast.models.export import COMFYUI_FILE, save_comfyui_lora, save_diffusers_lora, save_full_weights
from dopsd_fast.sample import save_grid
from dopsd_fast.train.config import load_config
from dopsd_fast.train.trainer import Trainer


def _train(out: Path, *extra: str) -> Path:
    assert main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}",
                 "--set", "train.steps=1", "--set", "train.resume=null", "--set", "data.num_pairs=3", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora") / "run")


def _oracle(run: Path) -> Trainer:
    """The whole Trainer of the run at its newest checkpoint, as `dopsd sample|export` built it before."""
    cfg = load_config(str(run / "config.yaml"), ["train.resume=null", f"train.output_dir={json.dumps(str(run))}",
                                                 "adapter.init_from=null", "data.encode_missing=true"])
    trainer = Trainer(cfg, progress=False)
    trainer.load(run / "checkpoints" / "step-000001")
    return trainer


@pytest.fixture
def built(monkeypatch):
    """Counts constructions of the data set, its batch stream, the student's and the teacher's context."""
    from dopsd_fast.contexts import toy
    from dopsd_fast.data import loader, synthetic

    seen = {"dataset": 0, "stream": 0, "text": 0, "teacher": 0}
    for key, cls in (("dataset", synthetic.SyntheticPairs), ("stream", loader.PairStream),
                     ("text", toy.ToyTextEncoder), ("teacher", toy.ToyMultimodalEncoder)):
        def init(self, *args, __key=key, __init=cls.__init__, **kwargs):
            seen[__key] += 1
            __init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)
    return seen


def test_export_builds_the_transformer_only_and_writes_what_the_trainer_wrote(lora_run, tmp_path, capsys, built):
    for fmt in ("diffusers", "comfyui", "full"):
        assert main(["export", str(lora_run), "--format", fmt, "--out", str(tmp_path / "new" / fmt)]) == 0
    assert built == {"dataset": 0, "stream": 0, "text": 0, "teacher": 0}
    capsys.readouterr()
    t = _oracle(lora_run)
    save_diffusers_lora(t.model, tmp_path / "old" / "diffusers")
    save_comfyui_lora(t.model, tmp_path / "old" / "comfyui" / COMFYUI_FILE)
    save_full_weights(t.roles.student_model, tmp_path / "old" / "full", "student")
    for fmt in ("diffusers", "comfyui", "full"):
        old, new = folder_contents(tmp_path / "old" / fmt), folder_contents(tmp_path / "new" / fmt)
        assert old and same_contents(old, new), fmt


def test_export_of_a_full_fine_tune_equals_the_trainers(tmp_path, built):
    run = _train(tmp_path / "full", "--set", "adapter.mode=full")
    built.update(dataset=0, stream=0, text=0, teacher=0)
    assert main(["export", str(run), "--format", "full", "--dtype", "bf16", "--out", str(tmp_path / "new")]) == 0
    assert built == {"dataset": 0, "stream": 0, "text": 0, "teacher": 0}
    save_full_weights(_oracle(run).roles.student_model, tmp_path / "old", None, torch.bfloat16)
    assert same_contents(folder_contents(tmp_path / "old"), folder_contents(tmp_path / "new"))


def test_sample_builds_no_data_stream_and_no_teacher(lora_run, tmp_path, capsys, built):
    png = tmp_path / "new.png"
    assert main(["sample", str(lora_run), "--out", str(png), "--steps", "2", "--seed", "3",
                 "--prompt", "a red circle", "--prompt", "two blue squares"]) == 0
    assert built == {"dataset": 0, "stream": 0, "text": 1, "teacher": 0}
    capsys.readouterr()
    t = _oracle(lora_run)
    images = t.sample_student(["a red circle", "two blue squares"], t.sampler_sigmas(2), seed=3)
    save_grid([[im] for im in images], tmp_path / "old.png", row_labels=["a red circle", "two blue squares"],
              col_labels=["student, 2 steps"])
    assert png.read_bytes() == (tmp_path / "old.png").read_bytes()


def test_sample_without_prompts_reads_the_data_sets_captions_not_its_stream(lora_run, tmp_path, capsys, built):
    png = tmp_path / "new.png"
    assert main(["sample", str(lora_run), "--out", str(png), "--steps", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert built == {"dataset": 1, "stream": 0, "text": 1, "teacher": 0}
    t = _oracle(lora_run)
    prompts = t.grid_pairs()[1]
    assert report["prompts"] == prompts and len(prompts) == 3
    save_grid([[im] for im in t.sample_student(prompts, t.sampler_sigmas(1), seed=0)], tmp_path / "old.png",
              row_labels=prompts, col_labels=["student, 1 steps"])
    assert png.read_bytes() == (tmp_path / "old.png").read_bytes()
