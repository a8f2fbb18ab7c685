"""Validation grids during training: fixed pairs and prompts, fixed noise, the model's few-step sampler.

Every ``validation.every`` steps and at the last step, rank 0 writes ``<output_dir>/validation/step-NNNNNN.png``,
appends a line to ``validation/grids.jsonl`` (step, grid path, rows, column prompts, sigmas, seed, seconds) and
adds the grid to the sinks of train.report_to (TensorBoard, wandb). Rows, top to bottom, labelled in the PNG:

  target   the data pair's image (centre square at data.image_size)
  base     the untouched model with the text context c_s (LoRA: adapters off)
  teacher  the EMA teacher with its privileged context c_t (prompt + target image)
  student  the student with c_s

Columns: the chosen data pairs, then ``validation.prompts`` (free text: no target and no teacher tile). Each row
draws its noise from a generator seeded with ``validation.seed``, so a column starts from the same noise in every
row and at every step. The base never changes, so its row is sampled once and kept in
``validation/base-<key>.safetensors``: full fine-tuning keeps no untouched copy of the weights after step 0, and a
resumed run reads the row back from there.

Under DeepSpeed every rank builds and runs a Validation inside ``Trainer.whole_weights`` (where a ZeRO-3 trainer
gathers its partitioned parameters); rank 0 alone samples and writes.

Sampling leaves the training state alone: the roll-out noise generator is not used, the global RNG is forked,
and every module's active adapter and train/eval flag are put back afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ..method.roles import LoRARoles
from ..nn.lora_linear import set_active_adapter
from ..progress import progress
from ..sample import save_grid, square_crop
from . import checkpoint as ckpt
from .config import ConfigError

ROWS = ("target", "base", "teacher", "student")


class Validation:
    def __init__(self, trainer):
        v, n = trainer.cfg.validation, len(trainer.dataset)
        bad = [] if isinstance(v.pairs, int) else [i for i in v.pairs if i >= n]
        if bad:
            raise ConfigError(f"validation.pairs: {bad} out of range; the data has {n} pairs (indices 0..{n - 1})")
        self.trainer, self.every, self.seed = trainer, v.every, v.seed
        self.dir = trainer.out / "validation"
        self.pairs, captions = trainer.grid_pairs(v.pairs)
        self.prompts = captions + list(v.prompts)
        self.sigmas = trainer.sampler_sigmas(v.steps or trainer.family.inference_steps)
        with trainer.whole_weights():
            self.base_row = self._base_row() if trainer.is_main else []

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.trainer.cfg.train.steps

    def run(self, step: int, log) -> Path | None:
        """Sample the teacher and student rows, write the grid and its record; ``log``: the run's StepLog.
        Every rank calls it (a ZeRO-3 trainer gathers the weights for rank 0); rank 0 samples and writes."""
        tic, tr = time.perf_counter(), self.trainer
        captions = self.prompts[:len(self.pairs)]
        with tr.whole_weights():
            if not tr.is_main:
                return None
            with self._sampling(), progress(total=2, desc=f"validation grid, step {step}", unit="row",
                                            enabled=tr.progress) as bar:
                teacher = []
                if self.pairs:          # c_t: prompt + the target image as the teacher sees it in training
                    c_t = tr.mm_encoder(captions, [p.image for p in self.pairs])
                    teacher = self._sample(tr.roles.use("teacher"), c_t)
                bar.update()
                student = self._sample(tr.roles.use("student"), tr.text_encoder(self.prompts))
                bar.update()
        size = tr.cfg.data.image_size
        blank = [None] * (len(self.prompts) - len(self.pairs))
        rows = [[square_crop(p.image, size) for p in self.pairs] + blank, self.base_row, teacher + blank, student]
        rows = [[_fit_tile(img) for img in row] for row in rows]
        path = save_grid(rows, self.dir / f"step-{step:06d}.png", upscale=max(1, 128 // size),
                         row_labels=list(ROWS), col_labels=self.prompts)
        record = {"step": step, "grid": str(path), "rows": list(ROWS), "columns": self.prompts,
                  "sigmas": self.sigmas, "seed": self.seed, "sec": time.perf_counter() - tic}
        with (self.dir / "grids.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.image("validation", step, path)
        return path

    def _sample(self, model, feats) -> list[torch.Tensor]:
        return self.trainer.sample_images(model, feats, self.sigmas, self.seed)

    @contextlib.contextmanager
    def _sampling(self):
        """No autograd, a forked global RNG, eval mode; adapters and train/eval flags restored afterwards."""
        tr = self.trainer
        models = list({id(m): m for m in (tr.roles.student_model, tr.roles.teacher_model)}.values())
        modules = [m for model in models for m in model.modules()]
        flags = [(m, m.training) for m in modules]
        adapters = [(m, m.active_adapter) for m in modules if hasattr(m, "active_adapter")]
        try:
            with torch.random.fork_rng(devices=[tr.device] if tr.device.type == "cuda" else []), torch.no_grad():
                for model in models:
                    model.eval()
                yield
        finally:
            for m, flag in flags:
                m.training = flag
            for m, name in adapters:
                m.active_adapter = name

    def _base_row(self) -> list[torch.Tensor | None]:
        """The untouched model's row: from its file, else sampled (and saved); blank when there is no base left."""
        tr = self.trainer
        cfg = tr.cfg.to_dict()
        model = {k: v for k, v in cfg["model"].items() if k not in ("checkpointing", "ops_backend", "compile")}
        what = {"model": model, "context": cfg["context"], "size": cfg["data"]["image_size"], "prompts": self.prompts,
                "sigmas": self.sigmas, "seed": self.seed}      # what the row depends on, not how it is computed
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        path = self.dir / f"base-{key}.safetensors"
        if path.is_file():
            saved = ckpt.load_tensors(path)
            return [saved[str(i)] for i in range(len(self.prompts))]
        with self._sampling():
            if isinstance(tr.roles, LoRARoles):
                set_active_adapter(tr.roles.model, None)
                base = tr.roles.model
            else:       # full fine-tuning: the student is the untouched model until its first optimizer step
                base = tr.roles.use("student") if tr.step == 0 else None
            row = None if base is None else self._sample(base, tr.text_encoder(self.prompts))
        if row is None:
            print(f"validation: {path} is missing and adapter.mode=full resumed at step {tr.step} without untouched "
                  "weights to sample; the base row stays blank")
            return [None] * len(self.prompts)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        ckpt.save_tensors(tmp, {str(i): img.cpu() for i, img in enumerate(row)})
        os.replace(tmp, path)           # a killed run never leaves a torn row behind
        return row


MAX_TILE = 512      # px: a 4 x 4 grid of 1024^2 tiles would be a 20-30 MB PNG every N steps


def _fit_tile(img: torch.Tensor | None) -> torch.Tensor | None:
    """Tiles above MAX_TILE are shrunk (area averaging) for the grid file; the samples themselves are untouched."""
    if img is None or max(img.shape[-2:]) <= MAX_TILE:
        return img
    scale = MAX_TILE / max(img.shape[-2:])
    size = [max(1, round(n * scale)) for n in img.shape[-2:]]
    return torch.nn.functional.interpolate(img[None].float(), size=size, mode="area")[0]
