"""Per-step table on the terminal (with a progress bar and ETA) and the sinks of ``train.report_to``: a JSONL log
beside the checkpoints (and the loss curve drawn from it), TensorBoard, wandb."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..progress import progress
from .finite import strict_row
from .loss_curve import draw_loss_curve
from .telemetry import open_tensorboard


def open_sinks(report_to: list[str], out: Path, first_step: int, config: dict) -> list:
    """train.report_to's destinations besides metrics.jsonl (TensorBoard, wandb), for global rank 0 only; a
    resumed run (``first_step`` > 1) continues them: TensorBoard hides its events from ``first_step`` on (written
    before the checkpoint it resumes from), wandb reopens the same run."""
    sinks = []
    if "tensorboard" in report_to:
        tb = open_tensorboard(out / "tensorboard", purge_step=first_step)
        sinks += [tb] if tb is not None else []
    if "wandb" in report_to:
        from .wandb_sink import WandB
        sinks.append(WandB(out, config, resumed=first_step > 1))
    return sinks


class StepLog:
    def __init__(self, path: Path | None, K: int, enabled: bool = True, sinks: list | tuple = (), main: bool = True,
                 anchor: bool = False):
        """``path``: the JSONL file, or None (train.report_to without jsonl, and ranks other than 0); ``sinks``:
        more destinations of every row and grid (``open_sinks``); ``main``: this process prints the table (global
        rank 0); ``enabled``: the progress bar may show (dopsd_fast/progress.py decides where); ``anchor``: the
        table has the anchor's loss column (method.anchor_per_iteration)."""
        self.path, self.K, self.sinks, self.main, self.anchor = path, K, list(sinks), main, anchor
        self.bar = progress(unit="it", enabled=enabled and main)
        self.header_done = False

    def start(self, step: int, total: int) -> None:
        self.bar.reset(total=total)
        self.bar.update(step)

    def _header(self) -> str:
        ks = " ".join(f"{'loss_' + str(k):>9}" for k in range(self.K))
        anchor = f" {'anchor':>9}" if self.anchor else ""
        return f"{'step':>6} {'loss':>10} {ks}{anchor} {'grad_norm':>10} {'lr':>9} {'s/it':>7}"

    def log(self, row: dict[str, Any], show: bool) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(strict_row(row), allow_nan=False) + "\n")     # NaN/Inf: null + "nonfinite"
        for sink in self.sinks:
            sink.log(row)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}")
        if show and self.main:
            if not self.header_done:
                tqdm.write(self._header())
                self.header_done = True
            ks = " ".join(f"{v:9.4g}" for v in row["losses"]) if len(row["losses"]) == self.K else f"{'':>{10 * self.K - 1}}"
            anchor = f" {_num(row.get('anchor_loss'), '9.4g')}" if self.anchor else ""
            tqdm.write(f"{row['step']:6d} {row['loss']:10.5g} {ks}{anchor} {_num(row['grad_norm'], '10.4g')} "
                       f"{row['lr']:9.2e} {row['sec']:7.3f}")

    def image(self, tag: str, step: int, path: Path) -> None:
        """A PNG written at ``step`` (validation grid): a line above the progress bar and an image in each sink."""
        for sink in self.sinks:
            sink.image(tag, path, step)
        if self.main:
            tqdm.write(f"{step:6d} {tag}: {path}")

    def note(self, text: str) -> None:
        """A one-off line (a choice made during the run, e.g. model.checkpointing=auto's plan) above the progress bar."""
        if self.main:
            tqdm.write(text)

    def loss_curve(self, png: Path, sigmas: list[float]) -> Path | None:
        """The JSONL's losses so far drawn as ``png`` (at each checkpoint); nothing without the JSONL."""
        if self.path is None or not self.path.is_file():
            return None
        return draw_loss_curve([json.loads(line) for line in self.path.read_text().splitlines()], png, sigmas)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()


def _num(value, spec: str) -> str:
    """A table cell; '-' where a number is unknown (null in the JSONL)."""
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)
