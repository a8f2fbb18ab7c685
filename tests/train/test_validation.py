"""Validation grids during training: when they are written, what they hold, and that training does not notice them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_fast.sample import square_crop, to_uint8
from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.metrics import StepLog
from dopsd_fast.train.trainer import make_trainer
from dopsd_fast.train.validation import Validation

# 2 pairs + 1 free-text prompt, 2 sampler steps: the grid logic, not the sampler, is under test here
VALIDATION = ["validation.every=2", "validation.pairs=[2, 0]", "validation.prompts=[a zorp on the left]",
              "validation.steps=2", "validation.seed=5", "train.checkpoint_every=3"]
TILE, PAD = 32 * 4 + 2, 2        # 32^2 samples upscaled 4x, 2-pixel gaps


def _grid(run, step) -> np.ndarray:
    with Image.open(run / "validation" / f"step-{step:06d}.png") as im:
        return np.asarray(im.convert("RGB"))


def _tile(grid: np.ndarray, row: int, col: int, rows: int = 4, cols: int = 3) -> np.ndarray:
    """Tile (row, col): the label margins sit left and on top, so count from the bottom-right corner."""
    h, w = grid.shape[:2]
    y, x = h - PAD - (rows - row) * TILE + PAD, w - PAD - (cols - col) * TILE + PAD
    return grid[y:y + TILE - PAD, x:x + TILE - PAD]


def test_grids_every_n_and_at_the_end_deterministic_and_invisible_to_training(tmp_path):
    """Run a: validation on for 5 steps. Run b: 3 steps with validation off, then resumed to 5 with it on. Same
    losses at every step (no training RNG consumed, resume exact) and the same grids (fixed noise)."""
    straight = tiny_trainer(tmp_path / "a", "train.steps=5", *VALIDATION)
    losses = [r.losses for r in straight.train()]
    first = tiny_trainer(tmp_path / "b", "train.steps=3", *VALIDATION[1:])
    rest = tiny_trainer(tmp_path / "b", "train.steps=5", "train.resume=auto", *VALIDATION)
    assert [r.losses for r in first.train() + rest.train()] == losses       # bit-exact on CPU
    for step in (4, 5):
        np.testing.assert_array_equal(_grid(tmp_path / "a", step), _grid(tmp_path / "b", step))

    records = [json.loads(line) for line in (tmp_path / "a" / "validation" / "grids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]               # every 2, and once at the (odd) end
    pairs = [straight.dataset[2], straight.dataset[0]]
    assert records[0]["rows"] == ["target", "base", "teacher", "student"]
    assert records[0]["columns"] == [p.captions[1] for p in pairs] + ["a zorp on the left"]
    assert len(records[0]["sigmas"]) == 3 and records[0]["seed"] == 5

    grid = _grid(tmp_path / "a", 5)
    assert (grid.shape[0] - PAD) % TILE > 0 and (grid.shape[1] - PAD) % TILE > 0    # label margins
    assert grid.shape[0] - PAD - 4 * TILE < 40 and grid.shape[1] - PAD - 3 * TILE < 80
    for col, pair in enumerate(pairs):      # the target row holds the pairs' images, upscaled 4x
        expected = to_uint8(square_crop(pair.image, 32)).repeat(4, 0).repeat(4, 1)
        np.testing.assert_array_equal(_tile(grid, 0, col), expected)
    for row in (0, 2):                      # the free-text prompt has no target and no teacher tile
        assert (_tile(grid, row, 2) == 255).all()
    for row in (1, 3):
        assert _tile(grid, row, 2).std() > 0
    # the untouched base row does not change while the student trains
    np.testing.assert_array_equal(_tile(_grid(tmp_path / "a", 2), 1, 0), _tile(grid, 1, 0))
    assert not np.array_equal(_tile(_grid(tmp_path / "a", 2), 3, 0), _tile(grid, 3, 0))


def test_same_noise_in_every_row_and_training_state_untouched(tmp_path):
    tr = tiny_trainer(tmp_path, "validation.every=1", "validation.pairs=2", "validation.steps=2")
    tr.roles.use("teacher")             # whatever was active before must be active after
    noise, rng = tr.noise.get_state(), torch.get_rng_state()
    Validation(tr).run(0, StepLog(None, K=4, enabled=False))
    assert torch.equal(tr.noise.get_state(), noise) and torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in tr.model.modules())
    assert {m.active_adapter for m in tr.model.modules() if hasattr(m, "active_adapter")} == {"teacher"}
    grid = _grid(tmp_path, 0)
    for col in range(2):    # at init the student adapter is zero: from the same noise it draws the base's image
        np.testing.assert_array_equal(_tile(grid, 1, col, cols=2), _tile(grid, 3, col, cols=2))
        assert not np.array_equal(_tile(grid, 2, col, cols=2), _tile(grid, 3, col, cols=2))   # the teacher sees c_t
    assert not np.array_equal(_tile(grid, 3, 0, cols=2), _tile(grid, 3, 1, cols=2))


def test_resumed_full_fine_tune_keeps_its_base_row(tmp_path):
    """Full fine-tuning has no untouched weights after step 0: the resumed run reads the base row back from
    validation/base-*.safetensors and draws the grid the uninterrupted run draws."""
    common = ["adapter.mode=full", "optim.lr=1e-4", *VALIDATION]
    tiny_trainer(tmp_path / "a", "train.steps=2", *common).train()
    tiny_trainer(tmp_path / "b", "train.steps=1", *common).train()
    tiny_trainer(tmp_path / "b", "train.steps=2", "train.resume=auto", *common).train()
    assert len(list((tmp_path / "b" / "validation").glob("base-*.safetensors"))) == 1
    np.testing.assert_array_equal(_grid(tmp_path / "a", 2), _grid(tmp_path / "b", 2))
    records = (tmp_path / "b" / "validation" / "grids.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2]                  # 1 ended the first run, 2 the resumed one


def test_tensorboard_gets_the_grid(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tiny_trainer(tmp_path, "train.steps=1", "train.report_to=[tensorboard,jsonl]", "validation.every=1", "validation.pairs=1",
                 "validation.steps=1").train()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (image,) = acc.Images("validation")
    assert image.step == 1 and (image.height, image.width) == _grid(tmp_path, 1).shape[:2]


def test_klein_teacher_row_with_reference_tokens(tmp_path):
    cfg = load_config("tiny-klein-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", "train.steps=1",
                                         "validation.every=1", "validation.pairs=1", "train.checkpoint_every=10"])
    tr = make_trainer(cfg, progress=False)
    tr.train()
    (record,) = [json.loads(line) for line in (tmp_path / "validation" / "grids.jsonl").read_text().splitlines()]
    assert len(record["sigmas"]) == 4 + 1           # klein's 4-step sampler (validation.steps: null)
    grid = _grid(tmp_path, 1)
    teacher, student = _tile(grid, 2, 0, cols=1), _tile(grid, 3, 0, cols=1)
    assert teacher.std() > 0 and not np.array_equal(teacher, student)   # c_t (prompt + reference) is not c_s


@pytest.mark.parametrize("overrides, message", [
    (["validation.every=-1"], "validation.every: must be >= 0"),
    (["validation.steps=0"], "validation.steps: must be >= 1"),
    (["validation.pairs=[1, -2]"], "validation.pairs: a count >= 0 or a list"),
    (["validation.pairs=true"], "validation.pairs: expected an integer"),
    (["validation.every=5", "validation.pairs=0"], "needs at least one column"),
    (["validation.evry=5"], "did you mean 'validation.every'"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", overrides)


def test_free_text_prompts_only(tmp_path):
    tiny_trainer(tmp_path, "train.steps=1", "validation.every=1", "validation.pairs=0", "validation.steps=1",
                 "validation.prompts=[a red circle, a zorp]").train()
    grid = _grid(tmp_path, 1)
    for col in range(2):
        assert (_tile(grid, 0, col, cols=2) == 255).all() and (_tile(grid, 2, col, cols=2) == 255).all()
        assert _tile(grid, 3, col, cols=2).std() > 0


def test_pair_index_out_of_range_names_the_data_size(tmp_path):
    tr = tiny_trainer(tmp_path, "train.steps=1", "validation.every=1", "validation.pairs=[0, 9]")
    with pytest.raises(ConfigError, match=r"validation.pairs: \[9\] out of range; the data has 4 pairs"):
        tr.train()


def test_off_by_default_and_zimage_default_steps(tmp_path):
    assert load_config("tiny-cpu").validation.every == 0
    tr = tiny_trainer(tmp_path, "train.steps=1", "validation.every=1", "validation.pairs=1")
    tr.train()
    record = json.loads((tmp_path / "validation" / "grids.jsonl").read_text())
    assert len(record["sigmas"]) == 8 + 1           # Z-Image-Turbo's 8-step sampler
    assert torch.tensor(record["sigmas"]).diff().lt(0).all()


def test_large_tiles_are_shrunk_for_the_grid_file():
    from dopsd_fast.train.validation import MAX_TILE, _fit_tile
    g = torch.Generator().manual_seed(0)
    big = torch.rand(3, 2 * MAX_TILE, 3 * MAX_TILE // 2, generator=g) * 2 - 1
    small = torch.rand(3, 64, 48, generator=g) * 2 - 1
    out = _fit_tile(big)
    assert out.shape == (3, 2 * MAX_TILE // 2, 3 * MAX_TILE // 4) and max(out.shape[-2:]) == MAX_TILE
    # area averaging of 2x2 blocks
    assert torch.allclose(out, big.view(3, MAX_TILE, 2, 3 * MAX_TILE // 4, 2).mean(dim=(2, 4)), atol=1e-6)
    assert _fit_tile(small) is small and _fit_tile(None) is None
