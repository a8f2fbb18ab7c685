"""Per-step table on the terminal (with a progress bar and ETA), a JSONL log beside the checkpoints, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .finite import strict_row
from .telemetry import open_tensorboard


class StepLog:
    def __init__(self, path: Path | None, K: int, enabled: bool = True, tensorboard: Path | None = None,
                 first_step: int = 1):
        """``path``: the JSONL file, or None on ranks that do not write (DeepSpeed ranks other than 0);
        ``tensorboard``: a log dir for the same rows as TensorBoard scalars, whose events from ``first_step`` on
        (written before the checkpoint a run resumes from) TensorBoard hides."""
        self.tb = open_tensorboard(tensorboard, purge_step=first_step) if tensorboard is not None else None
        self.path, self.K = path, K
        self.bar = tqdm(disable=not enabled, unit="it", dynamic_ncols=True, leave=False)
        self.header_done = False

    def start(self, step: int, total: int) -> None:
        self.bar.reset(total=total)
        self.bar.update(step)

    def _header(self) -> str:
        ks = " ".join(f"{'loss_' + str(k):>9}" for k in range(self.K))
        return f"{'step':>6} {'loss':>10} {ks} {'grad_norm':>10} {'lr':>9} {'s/it':>7}"

    def log(self, row: dict[str, Any], show: bool) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(strict_row(row), allow_nan=False) + "\n")     # NaN/Inf: null + "nonfinite"
        if self.tb is not None:
            self.tb.log(row)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}")
        if show and self.path is not None:
            if not self.header_done:
                tqdm.write(self._header())
                self.header_done = True
            ks = " ".join(f"{v:9.4g}" for v in row["losses"]) if len(row["losses"]) == self.K else f"{'':>{10 * self.K - 1}}"
            tqdm.write(f"{row['step']:6d} {row['loss']:10.5g} {ks} {_num(row['grad_norm'], '10.4g')} {row['lr']:9.2e} {row['sec']:7.3f}")

    def image(self, tag: str, step: int, path: Path) -> None:
        """A PNG written at ``step`` (validation grid): a line above the progress bar and a TensorBoard image."""
        if self.tb is not None:
            self.tb.image(tag, path, step)
        if self.path is not None:
            tqdm.write(f"{step:6d} {tag}: {path}")

    def note(self, text: str) -> None:
        """A one-off line (a choice made during the run, e.g. model.checkpointing=auto's plan) above the progress bar."""
        if self.path is not None:
            tqdm.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _num(value, spec: str) -> str:
    """A table cell; '-' where a number is unknown (null in the JSONL)."""
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)
