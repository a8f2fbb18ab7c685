"""End to end on tiny random components in the diffusers layout: `dopsd cache` then `dopsd train` on a folder of
5 generated PNGs (qwen3 contexts, VAE latents, buckets, batch 2), then the SFT baseline from the same caches."""
import json

import pytest
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


# ---------------------------------------------------------------- a warm cache: no encoder on the device
@pytest.fixture
def loads(monkeypatch):
    """Counts every load of the Qwen3 text encoder, the Qwen3-VL teacher and the VAE (devices of the VAE's)."""
    from dopsd_fast.contexts.qwen_text import QwenTextEncoder
    from dopsd_fast.contexts.teacher_vlm import QwenVLTeacher
    from dopsd_fast.models import loading

    seen = {"text": 0, "teacher": 0, "vae": []}
    text, teacher = QwenTextEncoder.from_pretrained.__func__, QwenVLTeacher.from_pretrained.__func__
    vae = loading.load_vae

    def count(key, fn):
        def wrapped(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    def load_vae(folder, dtype=torch.float32, device="cpu", vae_class=None):
        seen["vae"].append(str(device))
        return vae(folder, dtype, device, vae_class)

    monkeypatch.setattr(QwenTextEncoder, "from_pretrained", classmethod(count("text", text)))
    monkeypatch.setattr(QwenVLTeacher, "from_pretrained", classmethod(count("teacher", teacher)))
    monkeypatch.setattr(loading, "load_vae", load_vae)      # ZImageFamily.vae_codec imports it at each call
    return seen


def _losses(run):
    return [json.loads(line)["losses"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_warm_cache_trains_with_no_encoder_loaded(tiny_root, tmp_path, capsys, loads):
    (tmp_path / "data").mkdir()
    data, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    grid = ["--set", "validation.every=2", "--set", "validation.pairs=1", "--set", "validation.prompts=[a new thing]",
            "--set", "validation.steps=1",
            "--set", "method.anchor_per_iteration=1", "--set", "method.anchor_prompts=[an ordinary thing]"]
    assert main(["cache", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, tmp_path / "x"), *grid]) == 0
    assert json.loads(capsys.readouterr().out)["student_text"]["misses"] == 10   # 8 captions + free + anchor prompt
    assert loads == {"text": 1, "teacher": 1, "vae": ["cpu"]}
    loads.update(text=0, teacher=0, vae=[])
    # `dopsd cache` again: everything hits, so it loads nothing either
    assert main(["cache", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, tmp_path / "x"), *grid]) == 0
    assert json.loads(capsys.readouterr().out)["encoders_loaded"] == []
    assert loads == {"text": 0, "teacher": 0, "vae": []}

    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples", *_args(tiny_root, data, cache, tmp_path / "warm")])
    assert rc == 0, capsys.readouterr()
    assert loads == {"text": 0, "teacher": 0, "vae": []}          # nothing but the transformer was built
    # the same run encoding every batch (no cache, the encoders load up front) trains the same losses
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples",
               *_args(tiny_root, data, cache, tmp_path / "fly", "--set", "data.cache_dir=null")])
    assert rc == 0, capsys.readouterr()
    assert loads == {"text": 1, "teacher": 1, "vae": ["cpu"]}
    warm, fly = _losses(tmp_path / "warm"), _losses(tmp_path / "fly")
    assert len(warm) == 2
    torch.testing.assert_close(torch.tensor(warm), torch.tensor(fly), rtol=1e-5, atol=1e-7)

    # validation grids with a free-text prompt and the anchor on its prompt: their features were cached too; the
    # VAE decodes, on the CPU
    loads.update(text=0, teacher=0, vae=[])
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples",
               *_args(tiny_root, data, cache, tmp_path / "v"), *grid])
    assert rc == 0, capsys.readouterr()
    assert (tmp_path / "v" / "validation" / "step-000002.png").is_file()
    assert loads == {"text": 0, "teacher": 0, "vae": ["cpu"]}
    assert all("anchor_loss" in json.loads(row) for row in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines())
    # an anchor prompt the cache lacks: refused at start-up, naming it
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples", *_args(tiny_root, data, cache, tmp_path / "a"),
               *grid, "--set", "method.anchor_prompts=[never cached]", "--set", "data.encode_missing=false"])
    assert rc == 2 and "anchor prompt 'never cached'" in capsys.readouterr().err


def test_a_cache_miss_exits_2_naming_the_file_unless_encode_missing(tiny_root, tmp_path, capsys, loads):
    (tmp_path / "data").mkdir()
    data, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    assert main(["cache", "tiny-cpu", "--no-progress", *_args(tiny_root, data, cache, tmp_path / "x")]) == 0
    capsys.readouterr()
    gone = sorted((cache / "teacher_mm").rglob("*.safetensors"))[3]
    gone.unlink()
    loads.update(text=0, teacher=0, vae=[])
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples",
               *_args(tiny_root, data, cache, tmp_path / "r", "--set", "data.encode_missing=false")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(gone) in err and "`dopsd cache CONFIG`" in err and "data.encode_missing=true" in err, err
    assert loads == {"text": 0, "teacher": 0, "vae": []} and not (tmp_path / "r").exists()   # refused at start-up

    # opt-in: misses are encoded during training (all teacher entries gone, so the 4 drawn samples miss)
    for f in (cache / "teacher_mm").rglob("*.safetensors"):
        f.unlink()
    rc = main(["train", "tiny-cpu", "--no-progress", "--no-samples",
               *_args(tiny_root, data, cache, tmp_path / "r", "--set", "data.encode_missing=true")])
    assert rc == 0, capsys.readouterr()
    assert any((cache / "teacher_mm").rglob("*.safetensors"))      # encoded during training, and cached
    assert loads == {"text": 1, "teacher": 1, "vae": []}   # the teacher (which needs the text encoder's weights)


def test_identities_and_shapes_from_the_files_match_the_loaded_encoders(tiny_root):
    from dopsd_fast.contexts import qwen_text, teacher_vlm
    from dopsd_fast.data.vae_latents import VaeLatents
    from dopsd_fast.models.adapter import ZImageFamily
    from dopsd_fast.models.loading import load_vae, read_component_config

    spec = qwen_text.TextFeatureSpec(layers=(-2, 1), max_tokens=40)
    text = qwen_text.QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", spec)
    assert text.identity == qwen_text.folder_identity(tiny_root / "text_encoder", spec, torch.float32)
    assert text.feat_dim == qwen_text.folder_feature_dim(tiny_root / "text_encoder", spec)
    teacher = teacher_vlm.QwenVLTeacher.from_pretrained(tiny_root / "qwen3-vl", text, "text_first", 77, 1024, 4096,
                                                        spec=spec, prompt_text="raw")
    assert teacher.identity == teacher_vlm.folder_identity(tiny_root / "qwen3-vl", text.identity, spec, "text_first",
                                                           77, 1024, 4096, torch.float32, "raw")
    codec = VaeLatents(load_vae(tiny_root / "vae"))
    config = read_component_config(tiny_root / "vae", "vae/")
    for h, w in ((32, 48), (64, 64)):
        assert ZImageFamily().vae_latent_shape(config, h, w) == codec.latent_shape(h, w)
