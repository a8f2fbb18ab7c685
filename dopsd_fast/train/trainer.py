"""The trainer: parts assembled from the config, a loop that fits on a screen, atomic resumable checkpoints.

``Trainer.forward_backward_step`` is the one method an objective overrides (``SFTTrainer`` below); the
algorithm itself lives in :mod:`dopsd_fast.method`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
import warnings
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..data.loader import Batch
from ..ops._dispatch import use_backend
from ..models.export import lora_files
from ..method.step import StepOutput, dopsd_step, sft_step
from ..sample import decoded_samples, save_grid, square_crop
from . import checkpoint as ckpt
from .assemble import assemble, construct_transformer
from .config import Config, ConfigError, anchor_prompts
from .distributed import launched_world_size
from .finite import BadSteps
from .memory import fit_checkpointing
from .metrics import StepLog, open_sinks
from .optim import build_optimizer, build_scheduler, load_scheduler, scheduler_state, set_lr
from .run_dir import drop_rows_after, lock_output_dir
from .stop import StopRequest, TrainingStopped
from .telemetry import Telemetry
from .validation import Validation


class Trainer:
    is_main, rank, world = True, 0, 1         # a DeepSpeed run has one trainer per rank (deepspeed_engine.py)
    backward = staticmethod(torch.Tensor.backward)   # every backward of an iteration; DeepSpeed: engine.backward
    loss_weight = 1.0       # of an iteration's gradient; average_gradients divides the sum (DeepSpeed: 1 / grad_accum)
    build_transformer = staticmethod(construct_transformer)     # assemble's hook (weights, plan, dtype, device)
    copy_transformer = staticmethod(copy.deepcopy)       # assemble's hook: full fine-tuning's teacher copy

    def __init__(self, cfg: Config, progress: bool = True):
        # data, transformer, roles, contexts and codec (train/assemble.py); this rank's rows of each global batch
        parts = assemble(cfg, "train", rank=self.rank, world=self.world, progress=progress, main=self.is_main,
                         transformer=self.build_transformer, copy_model=self.copy_transformer)
        self.cfg, self.plan, self.dtype, self.device = cfg, parts.plan, parts.dtype, parts.device
        self.family, self.flow = parts.family, parts.family.flow    # everything that differs between model families
        self.dataset, self.stream = parts.dataset, parts.stream
        self.model, self.roles, self.base_state = parts.model, parts.roles, parts.base_state
        self.text_encoder, self.mm_encoder, self.codec = parts.text_encoder, parts.mm_encoder, parts.codec
        self.out = Path(cfg.train.output_dir)
        self.optimizer = build_optimizer(self.roles.trainable.values(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)     # optim.scheduler + warm-up, per optimizer step
        self.sigmas = self.plan.sigmas                  # at data.image_size; batches of other sizes: _sigmas_for
        self.sample_sigmas = self.sampler_sigmas(cfg.sample.steps)
        self.noise = torch.Generator().manual_seed(cfg.train.seed)
        self.step, self.micro_batch = 0, 0     # micro_batch: which of optim.grad_accum iterations of the step
        self.bad_steps = BadSteps(cfg.train.max_bad_steps)     # updates skipped for a NaN/Inf loss or grad norm
        self.progress = progress

    # ------------------------------------------------------------------ one iteration
    def forward_backward_step(self, batch: Batch) -> StepOutput:
        c_s = self.text_encoder(batch.prompts)
        c_t = self.mm_encoder(batch.prompts, batch.images)
        shapes = [self.codec.latent_shape(*img.shape[-2:]) for img in batch.images]
        sigmas = self._sigmas_for(shapes)
        out = dopsd_step(self.roles, self.flow, self._cast(c_s), self._cast(c_t), shapes, sigmas,
                         self.cfg.method.loss, self.cfg.method.per_step_backward, self.noise, self.dtype,
                         backward=self.backward, weight=self.loss_weight)
        self._count(out, shapes, c_s, c_t, len(sigmas) - 1)
        if self.cfg.method.anchor_per_iteration:
            anchor = self.self_distil(self.anchor_prompts())
            out.anchor_loss = anchor.loss
            out.flops, out.flops_verl_omni = out.flops + anchor.flops, out.flops_verl_omni + anchor.flops_verl_omni
            out.tokens += anchor.tokens
        return out

    def _count(self, out: StepOutput, shapes, c_s, c_t, k: int) -> None:
        """The iteration's model FLOPs (ours and VeRL-Omni's convention) and denoised image tokens, into ``out``."""
        lora = (self.cfg.adapter.rank, self.roles.targets) if self.cfg.adapter.mode == "lora" else None
        out.flops = sum(self.family.iteration_flops(self.plan.arch, shape, s, t, k, lora)
                        for shape, s, t in zip(shapes, c_s, c_t))
        out.flops_verl_omni = sum(self.family.iteration_flops_verl_omni(self.plan.arch, shape, s, t, k)
                                  for shape, s, t in zip(shapes, c_s, c_t))
        out.tokens = k * sum(self.family.image_tokens(self.plan.arch, s) for s in shapes)

    def self_distil(self, prompts: list[str]) -> StepOutput:
        """The self-distillation anchor: D-OPSD's step on ``prompts`` at data.image_size, its teacher given the
        student's own text-only context, so it holds the student's roll-outs to what the EMA teacher draws there."""
        c_s = self._cast(self.text_encoder(prompts))
        size = self.cfg.data.image_size
        shapes = [self.codec.latent_shape(size, size)] * len(prompts)
        out = dopsd_step(self.roles, self.flow, c_s, c_s, shapes, self.sigmas, self.cfg.method.loss,
                         self.cfg.method.per_step_backward, self.noise, self.dtype, backward=self.backward,
                         weight=self.loss_weight)
        self._count(out, shapes, c_s, c_s, len(self.sigmas) - 1)
        return out

    def anchor_prompts(self) -> list[str]:
        """This iteration's method.anchor_per_iteration captions of method.anchor_prompts, drawn with replacement
        from a generator of the seed, the step and the iteration's index in the step's global batch (rank + world x
        micro batch: a single process accumulating `world` iterations draws what `world` ranks draw); a resume draws
        the same ones."""
        index = self.rank + self.world * self.micro_batch
        rng = random.Random(f"anchor {self.cfg.train.seed} {self.step} {index}")
        return rng.choices(anchor_prompts(self.cfg), k=self.cfg.method.anchor_per_iteration)

    def _sigmas_for(self, shapes: list[tuple[int, ...]]) -> list[float]:
        """Roll-out schedule of a batch; FLUX.2 klein's depends on the image size, so a batch is one size bucket."""
        if len(set(shapes)) > 1 and self.cfg.method.schedule == "model":
            raise ValueError(f"method.schedule=model: a batch must hold one image size, got {sorted(set(shapes))}")
        return self.family.training_sigmas(self.cfg.method, self.cfg.sample, shapes[0])

    def sampler_sigmas(self, steps: int) -> list[float]:
        """The model's own few-step sampler at data.image_size (Z-Image: shift sample.shift; klein: empirical mu)."""
        return self.family.sampling_sigmas(steps, self.cfg.sample.shift, self.family.latent_shape(self.cfg, self.plan.arch))

    def learning_rate(self) -> float:
        """The learning rate of the coming optimizer step: the scheduler's (train/optim.py, a function of the step)."""
        return float(self.scheduler.get_last_lr()[0])     # AdamW8bit's is a tensor

    def accumulate(self) -> StepOutput:
        """One optimizer step's gradients: optim.grad_accum iterations on consecutive batches, each one's gradients
        added into ``.grad``, the sum then divided by their number (the gradient of the mean loss, as one iteration
        on all their rows would give); the returned losses are the iterations' means, FLOPs and tokens their sums."""
        n, outs = self.cfg.optim.grad_accum, []
        for self.micro_batch in range(n):      # DeepSpeed's ZeRO-3 clears its gradient partitions before the first
            outs.append(self.forward_backward_step(next(self.stream)))
        if n == 1:
            return outs[0]
        self.average_gradients(n)
        anchor = None if outs[0].anchor_loss is None else sum(o.anchor_loss for o in outs) / n
        return StepOutput(loss=sum(o.loss for o in outs) / n,
                          losses=[sum(ls) / n for ls in zip(*(o.losses for o in outs))],
                          flops=sum(o.flops for o in outs), flops_verl_omni=sum(o.flops_verl_omni for o in outs),
                          tokens=sum(o.tokens for o in outs), anchor_loss=anchor)

    def average_gradients(self, n: int) -> None:
        """The sum of ``n`` iterations' gradients -> their mean (DeepSpeed: each iteration's weighs 1 / n)."""
        grads = [p.grad for p in self.roles.trainable.values() if p.grad is not None]
        if grads:
            with torch.no_grad():
                torch._foreach_div_(grads, float(n))

    def advance_schedule(self) -> None:
        """After every optimizer step, skipped ones too: the learning rate stays a function of the step."""
        with warnings.catch_warnings():     # a skipped first update: torch warns that AdamW has not stepped yet
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def optimizer_step(self, loss: float = 0.0) -> float:
        """Clip, step AdamW, update the EMA teacher; returns the grad norm. With a NaN/Inf ``loss`` (the step's, on
        the host already) or grad norm nothing is updated and the gradients are dropped (``self.bad_steps``)."""
        o = self.cfg.optim
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            set_lr(group, lr)
        params = list(self.roles.trainable.values())
        # float(): the sync the logged norm always cost, now before AdamW runs, since it decides whether AdamW runs
        norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf")))
        if not self.bad_steps.check(loss, norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.roles.trainable_changed()
        self.roles.update_teacher(self.cfg.method.ema_decay)
        return norm

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[StepOutput]:
        """Train to train.steps; raises TrainingStopped (stop.py) after checkpointing if a signal asks to stop."""
        t = self.cfg.train
        self.resume_point()                     # a missing train.resume path, an unwritable output_dir: refused
        ckpt.check_writable(self.out)           # before the folder is created or anything is written
        named = t.resume not in (None, "auto")  # a checkpoint named by path is read, and a bad one refused, before
        if named:                               # the folder exists; "auto" reads its own folder's under the lock
            self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        stop = StopRequest()
        with lock_output_dir(self.out, holder=self.is_main), stop.installed():
            if not named:
                self.resume()
            self._write_run_files()
            main = self.is_main
            if main:
                drop_rows_after(self.step, self.out / "metrics.jsonl", self.out / "validation" / "grids.jsonl")
            sinks = open_sinks(t.report_to, self.out, self.step + 1, self.cfg.to_dict()) if main else []
            log = StepLog(self.out / "metrics.jsonl" if main and "jsonl" in t.report_to else None,
                          len(self.sigmas) - 1, enabled=self.progress, sinks=sinks, main=main,
                          anchor=bool(self.cfg.method.anchor_per_iteration))
            log.start(self.step, t.steps)
            try:
                with use_backend(self.cfg.model.ops_backend):
                    return self._loop(log, stop)
            finally:
                log.close()

    def _loop(self, log: StepLog, stop: StopRequest) -> list[StepOutput]:
        cfg, t = self.cfg, self.cfg.train
        history: list[StepOutput] = []
        telemetry = Telemetry.of(self)
        validation = Validation(self) if cfg.validation.every and self.step < t.steps else None
        telemetry.timer.take()                  # the base row's forwards are no training step's
        while self.step < t.steps:
            tic = time.perf_counter()
            with telemetry.timer.section("forward_backward"):
                result = self.accumulate()
            lr = self.learning_rate()           # this step's; the scheduler then moves on to the next one's
            with telemetry.timer.section("optimizer_s"):
                grad_norm = self.optimizer_step(result.loss)
                self.advance_schedule()
            # a skipped update (self.bad_steps) still counts: its batch and noise were drawn, so a resume stays exact
            self.step += 1
            if self.model.checkpointing.measuring:      # model.checkpointing=auto, after its first iteration
                self.model.checkpointing = fit_checkpointing(self.model.checkpointing, self.roles, self.optimizer, cfg,
                                                             len(self.sigmas) - 1)
                log.note(self.model.checkpointing.describe())
            history.append(result)
            sec = time.perf_counter() - tic
            row = {"step": self.step, "loss": result.loss, "losses": result.losses, "grad_norm": grad_norm,
                   "lr": lr, "ema_decay": cfg.method.ema_decay, "sec": sec,
                   "images_per_s": t.batch_size * cfg.optim.grad_accum * self.world / sec,
                   "model_tflop": result.flops / 1e12,
                   "model_tflops_per_s": result.flops / sec / 1e12, **telemetry.fields(result, sec),
                   **self.bad_steps.fields()}
            if result.anchor_loss is not None:
                row["anchor_loss"] = result.anchor_loss
            log.log(row, show=self.step % t.log_every == 0 or self.step == t.steps or self.bad_steps.skipped)
            self.bad_steps.raise_if_diverged(self.step, lr)   # before this save
            if validation is not None and validation.due(self.step):
                validation.run(self.step, log)
                telemetry.timer.take()
            saved = self.save() if self.step % t.checkpoint_every == 0 or self.step == t.steps else None
            if saved is not None:
                log.loss_curve(self.out / "loss.png", self.sigmas)
            if stop.agreed():       # every rank, once per step: a signal to any of them stops all at this step
                raise TrainingStopped(stop.reason, self.step, saved or self.save())
        return history

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def save(self) -> Path:
        names = list(self.roles.trainable)
        opt_tensors, groups = ckpt.optimizer_tensors(self.optimizer, names)
        rng = {"noise": self.noise.get_state(), "torch": torch.get_rng_state()}
        state = {"step": self.step, "data": self.stream.state_dict(), "param_groups": groups,
                 "scheduler": scheduler_state(self.scheduler), "config": self.cfg.to_dict(),
                 "bad_steps": self.bad_steps.state_dict()}
        parts = {"student": dict(self.roles.trainable), "teacher": self.roles.ema.state_dict(),
                 "optimizer": opt_tensors, "rng": rng}
        files = self.lora_files(parts["student"])
        final = ckpt.save_checkpoint(self.checkpoint_root, self.step, parts, state, self.cfg.train.keep_last, files)
        self.publish_lora(final, files)
        return final

    def lora_files(self, student: dict[str, torch.Tensor]) -> dict:
        """The student's LoRA in each of train.export_formats (file name -> (tensors, header)), written into every
        checkpoint: the student is what training produces (the EMA teacher is its smoothed copy, kept in
        teacher.safetensors), as `dopsd export` writes it. Nothing for full fine-tuning (adapter.mode=full)."""
        if self.cfg.adapter.mode != "lora":
            return {}
        return lora_files(self.model, self.cfg.train.export_formats, student)

    def publish_lora(self, final: Path, files: dict) -> None:
        """At the end of training, the last checkpoint's LoRA files also go into output_dir (diffusers' scripts'
        place for them)."""
        if files and self.step >= self.cfg.train.steps:
            ckpt.publish_files(final, self.out, list(files))

    def resume_point(self) -> Path | None:
        """The checkpoint ``train.resume`` points at: null, "auto" (newest in output_dir, if any) or a path."""
        r = self.cfg.train.resume
        if r == "auto":
            found = ckpt.list_checkpoints(self.checkpoint_root)
            return found[-1] if found else None
        if r is not None and not Path(r).is_dir():
            raise ckpt.CheckpointError(f"train.resume: {r}: no such checkpoint directory; pass a step-XXXXXX directory "
                                       "written by `dopsd train`, auto (the newest in train.output_dir) or null")
        return None if r is None else Path(r)

    def resume(self) -> Path | None:
        path = self.resume_point()
        if path is not None:
            changes = self.load(path)
            print(ckpt.resume_note(path, self.step, self.cfg.train.steps, changes))
        return path

    def load(self, path: Path) -> list[str]:
        """Continue from checkpoint ``path``; returns the config changes since it was written (resume_changes)."""
        state = ckpt.read_state(path, required=("step", "data", "param_groups", "config"))
        changes = ckpt.resume_changes(path, state["config"], self.cfg)
        student = ckpt.load_tensors(path / "student.safetensors", dict(self.roles.trainable))
        teacher = ckpt.load_tensors(path / "teacher.safetensors", self.roles.ema.state_dict())
        optim = ckpt.load_tensors(path / "optimizer.safetensors")
        rng_file = "rng-rank00000" if "world_size" in state else "rng"        # a DeepSpeed run's: its rank 0 noise
        rng = ckpt.load_tensors(path / f"{rng_file}.safetensors",
                                {"noise": self.noise.get_state(), "torch": torch.get_rng_state()})
        with torch.no_grad():
            for k, p in self.roles.trainable.items():
                p.copy_(student[k])
        self.roles.trainable_changed()
        self.roles.ema.load_state_dict(teacher)
        ckpt.load_optimizer(self.optimizer, list(self.roles.trainable), optim, state["param_groups"], path)
        self.noise.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        load_scheduler(self.scheduler, state.get("scheduler"), self.step, path / "state.json")
        self.bad_steps.load_state_dict(state.get("bad_steps"), path / "state.json")
        return changes

    def _write_run_files(self) -> None:
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if hasattr(self.dataset, "summary"):        # image folders: what was skipped and why
            summary = self.dataset.summary()
            (self.out / "data_summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
            print(f"data: {summary['usable']} usable, {summary['skipped']} skipped {summary['skipped_by_reason']}")
        base = self.out / "base.safetensors"
        if self.base_state is not None and not base.exists():
            # A randomly initialised base is part of the run: `dopsd sample` needs it to rebuild the student. Written
            # aside and renamed: a kill mid-write must not leave a torn file that every later resume keeps.
            tmp = base.with_name(base.name + ".tmp")
            try:
                save_file({k: v.contiguous() for k, v in self.base_state.items()}, str(tmp))
                os.replace(tmp, base)
            except (OSError, SafetensorError) as err:     # a full disk is a SafetensorError here
                tmp.unlink(missing_ok=True)
                raise ckpt.CheckpointError(f"{base}: not written: {ckpt.describe_os_error(err)}") from None

    # ------------------------------------------------------------------ samples
    def grid_pairs(self, which: int | list[int] = 4):
        """The data pairs a sample grid shows (the first ``which``, or those indices), and the caption variant
        used as each one's prompt."""
        index = range(min(which, len(self.dataset))) if isinstance(which, int) else which
        pairs = [self.dataset[i] for i in index]
        return pairs, [p.captions[min(1, len(p.captions) - 1)] for p in pairs]

    def sample_grid(self, path: Path, before: list | None = None) -> Path:
        """Rows: data pairs (labelled with their prompt); columns (labelled): target, [student before], student at the
        sampler's N steps, at the K training steps."""
        pairs, prompts = self.grid_pairs()
        cols = [[square_crop(p.image, self.cfg.data.image_size) for p in pairs]]
        if before is not None:
            cols.append(before)
        cols.append(self.sample_student(prompts, self.sample_sigmas))
        cols.append(self.sample_student(prompts, self.sigmas))
        names = ["target", *(["before"] if before is not None else []), f"after, {len(self.sample_sigmas) - 1} steps",
                 f"after, K={len(self.sigmas) - 1} steps"]
        size = self.cfg.data.image_size
        return save_grid([list(r) for r in zip(*cols)], path, upscale=max(1, 128 // size), row_labels=prompts,
                         col_labels=names)

    def sample_student(self, prompts: list[str], sigmas: list[float], seed: int | None = None):
        return self.sample_images(self.roles.use("student"), self.text_encoder(prompts), sigmas, seed)

    def whole_weights(self):
        """Where rank 0 alone may run the model for samples. Every rank enters it: a ZeRO-3 trainer gathers its
        partitioned parameters there (a collective); a single process and ZeRO <= 2 hold whole weights already."""
        return contextlib.nullcontext()

    def sample_images(self, model, feats, sigmas: list[float], seed: int | None = None):
        """(3, S, S) images at data.image_size from ``model`` on context features (c_s or c_t), one per feature;
        sample ``i`` starts from the i-th noise draw of a generator seeded with ``seed`` (default sample.seed)."""
        return decoded_samples(model, self.flow, self._cast(feats), self.codec, self.cfg.data.image_size, sigmas,
                               self.cfg.sample.seed if seed is None else seed, self.dtype, self.cfg.model.ops_backend)

    def _cast(self, feats):
        """Encoder outputs (features, latents; CPU or cached) -> the transformer's device and dtype."""
        return [f.to(self.device, self.dtype) for f in feats]


class SFTTrainer(Trainer):
    """The baseline: flow matching of the student on the target latents (off-policy)."""

    def forward_backward_step(self, batch: Batch) -> StepOutput:
        x0 = self._cast([self.codec.encode(img) for img in batch.images])
        c_s = self.text_encoder(batch.prompts)
        out = sft_step(self.roles, self.flow, self._cast(c_s), x0, self.cfg.method.sft_shift, self.noise)
        # forward + a full backward (2x); with LoRA the true backward is a little cheaper (see dopsd_iteration)
        out.flops = out.flops_verl_omni = sum(3 * self.family.forward_flops(self.plan.arch, tuple(x.shape), c).total
                                              for x, c in zip(x0, c_s))
        return out


def make_trainer(cfg: Config, progress: bool = True) -> Trainer:
    base = SFTTrainer if cfg.method.objective == "sft" else Trainer
    if cfg.deepspeed.stage is not None:
        from .deepspeed_engine import make_deepspeed_trainer
        return make_deepspeed_trainer(base, cfg, progress)
    if launched_world_size() > 1:
        raise ConfigError(f"launched as {launched_world_size()} processes, but deepspeed.stage is null: every process "
                          "would train the same run; set deepspeed.stage (e.g. --set deepspeed.stage=2)")
    return base(cfg, progress)
