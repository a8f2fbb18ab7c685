"""A folder-data run (qwen3 contexts, VAE latents, the Qwen3-VL teacher) exported and sampled after its data folder
is gone: the same files as before, with no data set, no teacher and (export) no encoder or VAE built."""
import shutil
from pathlib import Path

import pytest

from dopsd_fast.cli import main
from dopsd_fast.testing import folder_contents, same_contents
from test_qwen_training import _args, _folder, loads  # noqa: E402,F401  (same folder: the run's flags, the load counter)

FORMATS = ("diffusers", "comfyui", "full")
PROMPTS = ["--prompt", "thing 0", "--prompt", "a new thing"]     # a cached caption and one the text encoder encodes


@pytest.fixture
def data_built(monkeypatch):
    from dopsd_fast.data import buckets, folder

    seen = {"folder": 0, "stream": 0}
    for key, cls in (("folder", folder.ImageFolder), ("stream", buckets.BucketBatches)):
        def init(self, *args, __key=key, __init=cls.__init__, **kwargs):
            seen[__key] += 1
            __init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)
    return seen


def test_export_and_sample_without_the_data_folder(tiny_root, tmp_path, capsys, loads, data_built):
    (tmp_path / "data").mkdir()
    data, cache, run = _folder(tmp_path / "data"), tmp_path / "cache", tmp_path / "run"
    assert main(["cache", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, run)]) == 0
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples", *_args(tiny_root, data, cache, run,
                                                                          "--set", "train.steps=1")])
    assert rc == 0, capsys.readouterr()

    def export_and_sample(out):
        for fmt in FORMATS:
            assert main(["export", str(run), "--format", fmt, "--out", str(out / fmt)]) == 0
        exported = dict(loads, vae=list(loads["vae"])), dict(data_built)
        assert main(["sample", str(run), "--steps", "2", *PROMPTS, "--out", str(out / "grid.png")]) == 0
        return exported

    before = tmp_path / "before"
    export_and_sample(before)
    assert main(["sample", str(run), "--steps", "1", "--out", str(before / "default.png")]) == 0   # the data's captions
    capsys.readouterr()

    shutil.move(data, tmp_path / "gone")
    loads.update(text=0, teacher=0, vae=[])
    data_built.update(folder=0, stream=0)
    after = tmp_path / "after"
    exported, data_at_export = export_and_sample(after)
    assert exported == {"text": 0, "teacher": 0, "vae": []}      # export: the transformer and its adapters only
    assert data_at_export == {"folder": 0, "stream": 0}
    assert loads["teacher"] == 0 and loads["vae"] == ["cpu"]     # sample: the student's text and the VAE decoder
    assert data_built == {"folder": 0, "stream": 0}
    for fmt in FORMATS:
        assert folder_contents(before / fmt) and same_contents(folder_contents(before / fmt), folder_contents(after / fmt)), fmt
    assert (before / "grid.png").read_bytes() == (after / "grid.png").read_bytes()

    # the default prompts are the data's captions: gone with it, said so (exit 2), nothing written
    capsys.readouterr()
    assert main(["sample", str(run), "--steps", "1", "--out", str(after / "default.png")]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "pass --prompt or set sample.prompts" in err
    assert not (after / "default.png").exists()
