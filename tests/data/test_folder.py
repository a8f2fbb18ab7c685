"""Image folders: captions (sidecars, metadata.jsonl variants), buckets, crops, and every bad-input case skipped."""
import json
import logging

import pytest
import torch
from PIL import Image

from dopsd_fast.data.buckets import BucketBatches, make_buckets, nearest_bucket, resize_center_crop
from dopsd_fast.data.folder import DataError, ImageFolder


def _image(path, w, h, mode="RGB", seed=0, **save):
    g = torch.Generator().manual_seed(seed)
    if mode == "I;16":
        img = Image.fromarray(torch.randint(0, 65535, (h, w), generator=g, dtype=torch.int32).numpy().astype("uint16"))
    else:
        channels = len(Image.new(mode, (1, 1)).getbands())
        raw = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
        img = Image.fromarray(raw, mode if channels > 1 else "L").convert(mode)
    img.save(path, **save)
    return path


def _pair(folder, name, w=80, h=64, caption="a photo of a cat", seed=0, suffix=".png"):
    _image(folder / f"{name}{suffix}", w, h, seed=seed)
    if caption is not None:
        (folder / f"{name}.txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())


def test_buckets_around_the_target_area():
    b = make_buckets(1024)
    assert len(b) == 11 and (1024, 1024) in b
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b)
    assert all(0.85 < h * w / 1024**2 < 1.1 for h, w in b)
    assert nearest_bucket(600, 1000, b) == b.index((768, 1344)) or b[nearest_bucket(600, 1000, b)][1] > 1024
    assert make_buckets(32, 1) == [(32, 32)]
    with pytest.raises(ValueError, match="odd"):
        make_buckets(32, 4)


def test_resize_shorter_then_center_crop():
    img = Image.new("RGB", (90, 30))
    img.paste((255, 0, 0), (0, 0, 30, 30))            # left third red, the rest black
    x = resize_center_crop(img, 16, 16)                # scaled to 48x16, crop columns 16..32 (black)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (x[:, :, 2:] + 1).abs().max() < 0.05                 # away from the Lanczos ringing at the cut
    y = resize_center_crop(img, 16, 48)                # whole image: red on the left
    assert y[0, :, :10].mean() > 0.9 and y[0, :, -10:].mean() < -0.9


def test_sidecars_and_buckets(tmp_path):
    _pair(tmp_path, "wide", 120, 48, seed=1)
    _pair(tmp_path, "tall", 48, 120, seed=2)
    _pair(tmp_path, "square", 64, 64, caption="  a red square \n", seed=3)
    ds = ImageFolder(tmp_path, side=32, buckets=5)
    assert len(ds) == 3 and ds.summary()["skipped"] == 0
    shapes = {r.path.stem: tuple(ds[i].image.shape[1:]) for i, r in enumerate(ds.records)}
    assert shapes["square"] == (32, 32) and shapes["wide"][1] > shapes["wide"][0] and shapes["tall"][0] > shapes["tall"][1]
    assert ds[[r.path.stem for r in ds.records].index("square")].captions == ["a red square"]


def test_metadata_variants_one_drawn_per_iteration(tmp_path):
    for i in range(4):
        _image(tmp_path / f"{i}.png", 64, 64, seed=i)
    rows = [{"file_name": f"{i}.png", "caption": {"short": f"cat {i}", "detailed": f"a fluffy cat number {i}", "zh": "猫"}}
            for i in range(3)] + [{"file_name": "3.png", "text": ["one", "two"]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert ds[0].captions == ["cat 0", "a fluffy cat number 0", "猫"]
    stream = BucketBatches(ds, batch_size=2, seed=0)
    drawn = set()
    for _ in range(40):
        batch = next(stream)
        assert len(batch.images) == 2 and batch.images[0].shape == batch.images[1].shape
        drawn.update(batch.prompts)
    assert {"cat 0", "a fluffy cat number 0", "猫", "one", "two"} <= drawn


def test_batches_stay_within_a_bucket_and_resume(tmp_path):
    for i in range(5):
        _pair(tmp_path, f"w{i}", 120, 48, seed=i)
    for i in range(3):
        _pair(tmp_path, f"s{i}", 64, 64, seed=10 + i)
    ds = ImageFolder(tmp_path, side=32, buckets=5)
    a = BucketBatches(ds, batch_size=2, seed=7)
    seen = []
    for _ in range(12):
        batch = next(a)
        assert len({tuple(x.shape) for x in batch.images}) == 1
        seen.append(batch.prompts)
    b = BucketBatches(ds, batch_size=2, seed=7)
    b.load_state_dict({"epoch": 0, "position": 0})
    for _ in range(5):
        next(b)
    state = b.state_dict()
    c = BucketBatches(ds, batch_size=2, seed=7)
    c.load_state_dict(state)
    for k in range(5, 12):
        batch = next(c)
        assert batch.prompts == seen[k]


def test_every_bad_input_is_skipped_named_and_counted(tmp_path, caplog):
    _pair(tmp_path, "good", seed=1)
    _pair(tmp_path, "good_copy", seed=1)                                       # same bytes as good.png
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "corrupt.txt").write_text("x")
    _image(tmp_path / "truncated.jpg", 200, 200, seed=5, quality=95)
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("cut off")
    for name, mode in [("cmyk", "CMYK"), ("alpha", "RGBA"), ("deep", "I;16")]:
        _image(tmp_path / f"{name}.{'jpg' if mode == 'CMYK' else 'png'}", 64, 64, mode=mode, seed=6)
        (tmp_path / f"{name}.txt").write_text(name)
    _pair(tmp_path, "tiny", 12, 12, seed=7)
    _pair(tmp_path, "nocaption", caption=None, seed=8)
    _pair(tmp_path, "empty", caption="   \n", seed=9)
    _pair(tmp_path, "latin1", caption="caf\xe9".encode("latin-1"), seed=10)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.data.folder"):
        ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert [r.path.name for r in ds.records] == ["good.png"]
    s = ds.summary()
    assert s["usable"] == 1 and s["skipped"] == 10
    assert s["skipped_by_reason"] == {"duplicate": 1, "corrupt image": 2, "unsupported mode": 3, "tiny image": 1,
                                      "missing caption": 1, "empty caption": 1, "non-UTF-8 caption": 1}
    for name in ["good_copy.png", "corrupt.png", "truncated.jpg", "cmyk.jpg", "alpha.png", "deep.png", "tiny.png",
                 "nocaption.png", "empty.png", "latin1.png"]:
        assert any(name in r.message for r in caplog.records), name


def test_nothing_usable_fails_before_training(tmp_path):
    _pair(tmp_path, "nocap", caption=None)
    with pytest.raises(DataError, match=r"no usable image-caption pairs \(1 missing caption\)"):
        ImageFolder(tmp_path, side=32)
    with pytest.raises(DataError, match="not a directory"):
        ImageFolder(tmp_path / "absent", side=32)


def test_train_fails_on_an_unusable_folder_before_loading_weights(tmp_path, capsys):
    """The transformer's weights file is garbage: the data error must come first."""
    from dopsd_fast.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _pair(data, "nocap", caption=None)
    _pair(data, "tiny", 8, 8)
    model = tmp_path / "transformer"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        in_channels=3, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])))
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    rc = main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
               "--set", "model.arch={}", "--set", f"model.pretrained={json.dumps(str(model))}", "--set", "data.kind=folder",
               "--set", f"data.path={json.dumps(str(data))}", "--set", "data.buckets=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable image-caption pairs (1 missing caption, 1 tiny image)" in err
