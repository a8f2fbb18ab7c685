"""End to end on tiny random components in the diffusers layout: `dopsd cache` then `dopsd train` on a folder of
5 generated PNGs (qwen3 contexts, VAE latents, buckets, batch 2), then the SFT baseline from the same caches."""
import json

import torch
from PIL import Image

from dopsd_fast.cli import main


def _folder(root):
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (96, 48), (48, 96), (80, 64), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        raw = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(raw).save(root / f"img{i}.png")
    rows = [{"file_name": f"img{i}.png", "caption": {"short": f"thing {i}", "long": f"a detailed photo of thing {i}"}}
            for i in range(4)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))   # img4.png has no caption
    return root


def _args(tiny_root, data, cache, out, *extra):
    sets = {"model.pretrained": tiny_root / "transformer", "model.arch": "{}", "data.kind": "folder", "data.path": data,
            "data.image_size": 32, "data.buckets": 3, "data.cache_dir": cache, "context.kind": "qwen3",
            "context.max_text_tokens": 64, "context.teacher_model": tiny_root / "qwen3-vl",
            "context.teacher_min_pixels": 1024, "context.teacher_max_pixels": 4096, "adapter.rank": 4,
            "adapter.alpha": 8, "method.sigmas": "[1.0, 0.5]", "sample.steps": 2, "train.steps": 2, "train.batch_size": 2, "train.output_dir": out, "train.resume": "null"}
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v if isinstance(v, (int, str)) else json.dumps(str(v))}"]
    return args + list(extra)


def test_cache_then_train_then_sft(tiny_root, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    assert main(["cache", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, tmp_path / "run")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 4 and report["teacher_mm"] == {"hits": 0, "misses": 8}
    files = {p.parent.parent.parent.name: 0 for p in cache.rglob("*.safetensors")}
    for p in cache.rglob("*.safetensors"):
        files[p.parent.parent.parent.name] += 1
    # 4 usable images x 2 caption variants; one VAE latent per image
    assert files == {"student_text": 8, "teacher_mm": 8, "vae_latents": 4}

    rc = main(["train", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000002" / "student.safetensors").is_file()
    assert (run / "samples.png").is_file()
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["usable"] == 4 and summary["skipped_by_reason"] == {"missing caption": 1}
    assert "img4.png" in summary["skipped_files"]["missing caption"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert sum(1 for _ in cache.rglob("*.safetensors")) == 20             # training added nothing: all hits

    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples",
               *_args(tiny_root, data, cache, tmp_path / "sft", "--set", "method.objective=sft")])
    assert rc == 0, capsys.readouterr().out
    assert (tmp_path / "sft" / "checkpoints" / "step-000002" / "student.safetensors").is_file()
