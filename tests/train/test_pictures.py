"""The pictures a run leaves: loss.png at each checkpoint (from metrics.jsonl) and a labelled samples.png."""
import numpy as np
from PIL import Image

from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train.loss_curve import MEAN_COLOUR, STEP_COLOURS, draw_loss_curve

SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]


def colours(png) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).tolist()}


def test_loss_curve_and_labelled_samples_of_a_run(tmp_path):
    tr = tiny_trainer(tmp_path, "train.steps=2", "train.checkpoint_every=1", "train.report_to=[jsonl]")
    tr.train()
    drawn = colours(tmp_path / "loss.png")
    assert MEAN_COLOUR in drawn and set(STEP_COLOURS[:len(tr.sigmas) - 1]) <= drawn     # every line is there
    grid = Image.open(tr.sample_grid(tmp_path / "samples.png"))
    tile, pad, pairs = 128 + 2, 2, 4         # 32 px samples shown at 4x, 2 px apart
    unlabelled = (3 * tile + pad, pairs * tile + pad)       # target | after N steps | after K steps
    assert grid.size[0] > unlabelled[0] and grid.size[1] > unlabelled[1]    # a margin for the prompts, a strip above


def test_without_jsonl_there_is_no_metrics_file_and_no_curve(tmp_path):
    tiny_trainer(tmp_path, "train.steps=1", "train.report_to=[]").train()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "loss.png").exists()
    assert (tmp_path / "checkpoints" / "step-000001").is_dir()


def test_a_nonfinite_step_leaves_a_gap_and_no_finite_loss_draws_nothing(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "losses": [0.5 / s, 1.5 / s, 1.0 / s, 1.0 / s]} for s in range(1, 41)]
    rows[20] = {"step": 21, "loss": None, "losses": [None] * 4, "nonfinite": ["loss", "losses"]}
    png = draw_loss_curve(rows, tmp_path / "loss.png", SIGMAS)
    image = np.asarray(Image.open(png).convert("RGB"))
    black = (image == MEAN_COLOUR).all(-1)
    columns = np.flatnonzero(black[40:-50, 75:-200].any(0))         # the plot area (no title, ticks or legend)
    assert len(columns) and np.diff(columns).max() > 3              # the mean's line breaks at step 21
    assert draw_loss_curve([{"step": 1, "loss": None, "losses": [None] * 4}], tmp_path / "none.png", SIGMAS) is None
    assert not (tmp_path / "none.png").exists()
