"""Image folders: captions (sidecars, metadata.jsonl variants), buckets, crops, and every bad-input case skipped."""
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_fast.data.buckets import BucketBatches, make_buckets, nearest_bucket, resize_center_crop
from dopsd_fast.data.folder import DataError, ImageFolder, read_deep_png


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
    for name, mode in [("cmyk", "CMYK"), ("alpha", "RGBA"), ("greyalpha", "LA")]:
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
    for name in ["good_copy.png", "corrupt.png", "truncated.jpg", "cmyk.jpg", "alpha.png", "greyalpha.png", "tiny.png",
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


# ---------------------------------------------------------------- 16-bit PNGs

def _png16(path, samples: np.ndarray):
    """Write (H, W, 3) or (H, W) uint16 samples as a 16-bit RGB / greyscale PNG (Pillow cannot write 16-bit RGB).
    Row filters cycle through None, Sub, Up, Average and Paeth, so the decoder's unfiltering (which depends on the
    6-byte RGB pixel) is exercised."""
    h, w = samples.shape[:2]
    colour, bpp = (2, 6) if samples.ndim == 3 else (0, 2)
    rows = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(h, -1).astype(np.int16)
    prev, out = np.zeros_like(rows[0]), b""
    for y, row in enumerate(rows):
        a = np.concatenate([np.zeros(bpp, np.int16), row[:-bpp]])
        b, c = prev, np.concatenate([np.zeros(bpp, np.int16), prev[:-bpp]])
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = [0, a, b, (a + b) // 2, np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))][y % 5]
        out += bytes([y % 5]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b""))
    return path


def test_16bit_rgb_png_is_read_at_full_depth(tmp_path):
    """Pillow alone keeps the top byte of each sample (floor(v / 256)): up to one 8-bit level off v / 257."""
    g = np.random.default_rng(0)
    samples = g.integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    samples[0, :4] = [[0, 0, 0], [65535, 65535, 65535], [255, 256, 32767], [32896, 65279, 65280]]
    _png16(tmp_path / "deep.png", samples)
    with Image.open(tmp_path / "deep.png") as im:               # what Pillow makes of it on its own
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), samples >> 8)
    (tmp_path / "deep.txt").write_text("a deep photo")
    ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert ds.summary()["skipped"] == 0
    x = ds[0].image                                              # 32x32 = the bucket: no resampling
    want = torch.from_numpy(samples.astype(np.float32) / 65535).permute(2, 0, 1) * 2 - 1
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)


def test_16bit_png_resized_like_its_8bit_twin(tmp_path):
    """The float path resizes and crops with the 8-bit path's geometry; they agree up to 8-bit rounding."""
    g = np.random.default_rng(1)
    smooth = np.cumsum(g.integers(0, 700, (48, 80, 3)), axis=1).clip(0, 65535).astype(np.uint16)
    _png16(tmp_path / "wide16.png", smooth)
    Image.fromarray(np.round(smooth / 257).astype(np.uint8)).save(tmp_path / "wide8.png")
    deep = resize_center_crop(read_deep_png(tmp_path / "wide16.png"), 32, 48)
    with Image.open(tmp_path / "wide8.png") as im:
        flat = resize_center_crop(im, 32, 48)
    assert deep.shape == flat.shape == (3, 32, 48)
    assert (deep - flat).abs().max() < 1.5 / 127.5


def test_16bit_greyscale_png_is_used_not_clipped(tmp_path):
    g = np.random.default_rng(2)
    samples = g.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(samples).save(tmp_path / "grey.png")         # Pillow writes 16-bit greyscale itself
    _png16(tmp_path / "grey_filtered.png", samples[::-1].copy())
    for name in ("grey", "grey_filtered"):
        (tmp_path / f"{name}.txt").write_text(name)
    with Image.open(tmp_path / "grey.png") as im:               # convert("RGB") would clip it to white
        assert im.mode in ("I;16", "I") and (np.asarray(im.convert("RGB")) == 255).mean() > 0.99
    ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert ds.summary()["skipped"] == 0 and len(ds) == 2
    for i, r in enumerate(ds.records):
        plane = samples if r.path.stem == "grey" else samples[::-1]
        want = torch.from_numpy(plane.astype(np.float32) / 65535).expand(3, -1, -1) * 2 - 1
        torch.testing.assert_close(ds[i].image, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- metadata.jsonl lines and captions

def test_numeric_caption_is_text_and_a_non_text_one_is_skipped_naming_the_line(tmp_path, caplog):
    for i in range(4):
        _image(tmp_path / f"{i}.png", 64, 64, seed=i)
    rows = [{"file_name": "0.png", "caption": 2024}, {"file_name": "1.png", "text": [1.5, "a cat", None]},
            {"file_name": "2.png", "caption": {"year": 1999, "short": "a dog"}}, {"file_name": "3.png", "caption": True}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.data.folder"):
        ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert {r.path.name: r.captions for r in ds.records} == {"0.png": ["2024"], "1.png": ["1.5", "a cat"],
                                                              "2.png": ["1999", "a dog"]}
    assert ds.summary()["skipped_files"] == {"invalid caption": ["3.png"]}
    assert any("3.png" in r.message and "metadata.jsonl:4" in r.message for r in caplog.records)


def test_malformed_metadata_lines_are_skipped_and_counted(tmp_path, caplog):
    for i in range(2):
        _image(tmp_path / f"{i}.png", 64, 64, seed=i)
    lines = [json.dumps({"file_name": "0.png", "caption": "a cat"}).encode(), b"{not json", b'["a", "b"]',
             b'{"caption": "no file name"}', b'{"file_name": 5, "caption": "x"}',
             b'{"file_name": "1.png", "caption": "caf\xe9"}',                 # Latin-1, not UTF-8
             b"", json.dumps({"file_name": "1.png", "caption": "a dog"}).encode()]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.data.folder"):
        ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert {r.path.name: r.captions for r in ds.records} == {"0.png": ["a cat"], "1.png": ["a dog"]}
    bad = [f"metadata.jsonl:{n}" for n in (2, 3, 4, 5, 6)]
    assert ds.summary()["skipped_files"] == {"malformed metadata line": bad}
    for where in bad:
        assert any(where in r.message and "skipped" in r.message for r in caplog.records), where


def test_a_metadata_file_with_a_byte_order_mark_is_read(tmp_path):
    _image(tmp_path / "0.png", 64, 64)
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"file_name": "0.png", "caption": "x"}).encode())
    assert ImageFolder(tmp_path, side=32, buckets=1)[0].captions == ["x"]


# ---------------------------------------------------------------- entries that are not regular files

def test_symlink_loops_broken_links_and_fifos_are_counted(tmp_path, caplog):
    _pair(tmp_path, "good")
    os.symlink("loop.png", tmp_path / "loop.png")                     # points at itself
    os.symlink("ping.png", tmp_path / "pong.png")
    os.symlink("pong.png", tmp_path / "ping.png")
    os.symlink("nowhere.png", tmp_path / "broken.png")
    os.mkfifo(tmp_path / "pipe.png")                                 # reading it would block forever
    for name in ("loop", "ping", "pong", "broken", "pipe"):
        (tmp_path / f"{name}.txt").write_text(name)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.data.folder"):
        ds = ImageFolder(tmp_path, side=32, buckets=1)
    assert [r.path.name for r in ds.records] == ["good.png"]
    assert ds.summary()["skipped_files"] == {"symlink loop": ["loop.png", "ping.png", "pong.png"],
                                             "broken symlink": ["broken.png"], "not a regular file": ["pipe.png"]}
    for name in ("loop.png", "ping.png", "broken.png", "pipe.png"):
        assert any(name in r.message for r in caplog.records), name


def test_metadata_entry_naming_a_loop_or_a_folder(tmp_path):
    _image(tmp_path / "0.png", 64, 64)
    os.symlink("loop.png", tmp_path / "loop.png")
    (tmp_path / "sub.png").mkdir()
    rows = [{"file_name": n, "caption": "x"} for n in ("0.png", "loop.png", "sub.png", "absent.png")]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = ImageFolder(tmp_path, side=32, buckets=1).summary()["skipped_files"]
    assert s == {"symlink loop": ["loop.png"], "not a regular file": ["sub.png"], "missing image": ["absent.png"]}


# ---------------------------------------------------------------- extreme aspect ratios

def test_an_image_the_crop_reduces_to_a_sliver_is_warned_and_counted(tmp_path, caplog):
    _pair(tmp_path, "panorama", 400, 40, seed=1)          # 10:1 -> its 48x16 bucket (3:1) keeps 30%
    _pair(tmp_path, "tower", 30, 200, seed=2)             # 1:6.7 -> 45%
    _pair(tmp_path, "wide", 160, 64, seed=3)              # 2.5:1 -> 84%, fine
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.data.folder"):
        ds = ImageFolder(tmp_path, side=32, buckets=5)
    s = ds.summary()
    assert s["usable"] == 3 and s["skipped"] == 0                          # warned, still trained on
    assert s["warned_by_reason"] == {"extreme aspect ratio": 2}
    assert s["warned_files"] == {"extreme aspect ratio": ["panorama.png", "tower.png"]}
    assert any("panorama.png" in r.message and "keeps 30%" in r.message for r in caplog.records)
    # square crops only (data.buckets=1): anything beyond 2:1 keeps less than half
    assert ImageFolder(tmp_path, side=32, buckets=1).summary()["warned_files"]["extreme aspect ratio"] == [
        "panorama.png", "tower.png", "wide.png"]


def test_the_run_writes_every_count_to_data_summary_json(tmp_path):
    from dopsd_fast.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _pair(data, "photo", 64, 64, seed=1)
    _pair(data, "panorama", 200, 20, seed=2)
    _png16(data / "deep.png", np.random.default_rng(3).integers(0, 65536, (48, 48, 3), dtype=np.uint16))
    (data / "deep.txt").write_text("a deep photo")
    os.symlink("loop.png", data / "loop.png")
    (data / "loop.txt").write_text("a loop")
    rc = main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
               "--set", "train.steps=1", "--set", "train.resume=null", "--set", "data.kind=folder",
               "--set", f"data.path={json.dumps(str(data))}", "--set", "data.buckets=1", "--set", "data.cache_dir=null"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["usable"] == 3 and summary["skipped_files"] == {"symlink loop": ["loop.png"]}
    assert summary["warned_files"] == {"extreme aspect ratio": ["panorama.png"]}
