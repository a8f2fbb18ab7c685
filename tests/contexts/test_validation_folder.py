"""Validation grids on the real-data path: an image folder with non-square buckets, Qwen3 text features, the
Qwen3-VL teacher and VAE latents (tiny random components, diffusers layout)."""
import json

import numpy as np
import torch
from PIL import Image

from dopsd_fast.cli import main


def test_zimage_folder_run_writes_validation_grids(tiny_root, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(96, 48), (48, 96), (64, 64)]):
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of thing {i}")
    sets = {"model.pretrained": tiny_root / "transformer", "model.arch": "{}", "data.kind": "folder", "data.path": data,
            "data.image_size": 32, "data.buckets": 3, "data.cache_dir": tmp_path / "cache",
            "data.encode_missing": "true", "context.kind": "qwen3",         # no `dopsd cache` first
            "context.max_text_tokens": 48, "context.teacher_model": tiny_root / "qwen3-vl",
            "context.teacher_min_pixels": 1024, "context.teacher_max_pixels": 4096, "adapter.rank": 4,
            "adapter.alpha": 8, "method.sigmas": "[1.0, 0.5]", "train.steps": 3, "train.output_dir": tmp_path / "run",
            "train.resume": "null", "validation.every": 2, "validation.pairs": "[1, 0]",
            "validation.prompts": "[a photo of something new]", "validation.steps": 2}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v if isinstance(v, (int, str)) else json.dumps(str(v))}")]
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "validation: " in captured.out                   # a line above the progress bar for each grid
    run = tmp_path / "run" / "validation"
    records = [json.loads(line) for line in (run / "grids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3]
    assert records[0]["columns"][-1] == "a photo of something new" and len(records[0]["columns"]) == 3
    with Image.open(run / "step-000003.png") as im:
        grid = np.asarray(im.convert("RGB"))
    tile = 32 * 4 + 2                    # 32^2 samples upscaled 4x, 2-pixel gaps; label margins left and on top
    assert grid.shape[0] > 4 * tile + 2 and grid.shape[1] > 3 * tile + 2
    student = grid[-tile:-2, -3 * tile:-2]
    assert np.isfinite(student).all() and student.std() > 0
