"""``train.report_to: [wandb]``: each step's row as a Weights & Biases history row, validation grids as images.

Global rank 0 alone opens the run (train/metrics.py gives the other ranks no sinks). The run's whole config is
wandb's config. wandb's own variables choose where it goes: WANDB_PROJECT (default "dopsd"), WANDB_ENTITY,
WANDB_MODE (offline: files only, `wandb sync` later) and WANDB_DIR (default: the run's output_dir, beside
tensorboard/). The run id is kept in ``<output_dir>/wandb_run_id``, so a resumed training run continues the same
wandb run; a run started from scratch (step 0) gets a new one.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from .._extras import require
from .config import ConfigError
from .telemetry import scalars

RUN_ID_FILE = "wandb_run_id"


def import_wandb() -> ModuleType:
    """The wandb package, or MissingExtra naming the [wandb] extra."""
    return require("wandb", "wandb", "train.report_to: [wandb]")


class WandB:
    def __init__(self, out: Path, config: dict, resumed: bool):
        """``out``: the run's output_dir; ``resumed``: the trainer continues a checkpoint (same wandb run)."""
        self.wandb = import_wandb()
        id_file = out / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None     # None: wandb picks one
        try:
            self.run = self.wandb.init(id=run_id, resume="allow", name=out.name,
                                       project=os.environ.get("WANDB_PROJECT", "dopsd"),
                                       dir=os.environ.get("WANDB_DIR", str(out)))
        except self.wandb.Error as err:         # no API key, no network, a bad entity: say so, no traceback
            raise ConfigError(f"train.report_to: [wandb]: wandb could not start the run ({err}); run `wandb login`, "
                              "set WANDB_MODE=offline (sync later with `wandb sync`), or leave wandb out of "
                              "train.report_to") from None
        id_file.write_text(self.run.id + "\n")
        # a resume may change the keys checkpoint.RESUMABLE allows (train.steps ...): the run's config follows it
        self.run.config.update(config, allow_val_change=True)

    def log(self, row: dict) -> None:
        # A resume retrains the steps logged after its checkpoint; wandb refuses steps below its last one (with a
        # warning each) and already holds them: an exact resume recomputes the same values.
        if row["step"] >= self.run.step:
            self.run.log(scalars(row), step=row["step"])

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
