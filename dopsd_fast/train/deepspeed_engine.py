"""The trainer on a DeepSpeed engine: optimizer, gradient clipping, bf16 and ZeRO 0/1/2/3 belong to DeepSpeed.

Launch one process per device (``torchrun --nproc_per_node N -m dopsd_fast.cli train CONFIG --set
deepspeed.stage=2``, or the ``deepspeed`` launcher with a hostfile). Each rank trains on its rows of a global
batch of ``train.batch_size * world`` pairs with its own roll-out noise; the method code is untouched.

Per-step backward under DeepSpeed: the engine runs in caller-owned accumulation
(``managed_gradient_accumulation: false``). ``dopsd_step`` hands each of its K + 1 backwards (loss_k / K after
roll-out step k, then the caption path once) to ``engine.backward`` without the engine's 1/GAS scaling; they
accumulate into the (ZeRO-partitioned) gradients, and one ``engine.step()`` per optimizer step averages over
ranks, clips and updates. The result is the gradient of the mean loss, as in the single-process trainer. With
``optim.grad_accum`` N > 1 the step's N iterations all backpropagate into the same gradients, each loss divided by
N (``dopsd_step``'s weight), before that one ``engine.step()`` (DeepSpeed's own ``gradient_accumulation_steps`` stays 1: in caller-owned mode
the boundary is ``step()``, not a micro-step count).

ZeRO stages 0, 1 and 2 keep whole parameters on every rank, so the EMA teacher and both roles' forwards are the
single-process code. ZeRO-3 partitions every parameter, a LoRA run's frozen base included, and a full fine-tuning
run's teacher module the same way as its student (``zero3.py``): the EMA runs on each rank's slices, and with
``deepspeed.gather_once`` the roll-out gathers every parameter of both roles once per iteration. A pretrained
run's transformer (LoRA or full, with ``model.merge_loras`` folded in) is built partitioned (``build_transformer``):
no rank ever holds the whole model.

Checkpoints reuse ``checkpoint.py``'s atomic directory: every rank writes into ``step-XXXXXX.tmp`` (DeepSpeed's
model/optimizer shards under ``deepspeed/``, its own ``rng-rankNNNNN.safetensors``), rank 0 adds the
student (fp32 masters), EMA teacher and AdamW state as whole safetensors by parameter name (``reshard.py``) and
``state.json`` last, then renames. A resume on the same world size and stage reads DeepSpeed's shards; on another
(or from the single-process trainer) each rank cuts its partitions from the safetensors files instead. The
``deepspeed/`` shards are DeepSpeed's own pickled format, so a resume reads them only with
``torch.load(weights_only=True)`` and the three DeepSpeed types its ZeRO 0-3 states hold allow-listed
(``load_shards_safely``): a file that needs anything else is refused, naming it, before DeepSpeed reads a byte; ``zero_to_fp32.py`` beside them exports the student (under
ZeRO-3 from the optimizer's fp32 slices).
"""
from __future__ import annotations

import contextlib
import copy
import math
import pickle
from pathlib import Path

import torch
from torch import Tensor

from .._extras import require
from ..method.ema import EMATeacher
from ..method.roles import FullRoles
from . import checkpoint as ckpt
from . import distributed as dist
from . import finite
from . import reshard
from . import watchdog
from . import zero3
from .assemble import construct_transformer
from .config import Config
from .optim import build_scheduler, load_scheduler, scheduler_state


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def engine_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON config of a run (``deepspeed.extra`` merged last)."""
    ds, b = cfg.deepspeed, cfg.train.batch_size
    zero: dict = {"stage": ds.stage}
    if ds.stage == 3:
        # else partitioning the model replaces torch.nn.functional.linear process-wide with DeepSpeed's own autograd
        # function, which re-gathers weights in its backward on its own schedule; the hooks already do it
        zero["memory_efficient_linear"] = False
        if ds.gather_once:
            # small "persistent" parameters stay whole between steps but are re-gathered one collective each
            # after every optimizer step; gathering all parameters once per iteration makes that pure overhead
            zero["stage3_param_persistence_threshold"] = 0
    conf = {
        "train_micro_batch_size_per_gpu": b,
        "train_batch_size": b * world,
        "gradient_accumulation_steps": 1,          # optim.grad_accum is caller-owned too (dopsd_step's weight)
        "managed_gradient_accumulation": False,     # the K + 1 backwards of an iteration; step() is the boundary
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,      # the client optimizer is torch.optim.AdamW
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "steps_per_print": 2**31 - 1,               # the trainer prints its own table
        "comms_logger": {"enabled": ds.comm_timing, "prof_all": True, "verbose": False, "debug": False},
    }
    return _merge(conf, ds.extra)


def _shard_types() -> list:
    """What DeepSpeed 0.19's ZeRO 0-3 states (fp32 and bf16) pickle besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def load_shard(path, map_location=None, mmap: bool = False):
    """One DeepSpeed ``.pt`` file through torch's weights-only unpickler (it builds tensors, builtins and the
    allow-listed types, and calls nothing else): a file that asks for more is refused, naming it."""
    try:
        with torch.serialization.safe_globals(_shard_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        raise ckpt.CheckpointError(f"{path}: refused to unpickle this DeepSpeed shard ({str(err).splitlines()[0]}); "
                                   "it holds more than tensors and DeepSpeed's checkpoint types. Resume from a "
                                   "checkpoint this trainer wrote, or start a new output_dir") from err


@contextlib.contextmanager
def load_shards_safely(engine, folder: Path):
    """Check every ``.pt`` under ``folder`` (memory-mapped: the pickles, not the tensor bytes) before DeepSpeed
    reads any, on every rank alike so all refuse together; then route DeepSpeed's own reads (its checkpoint
    engine's ``load``, torch.load(weights_only=False) in 0.19) through ``load_shard`` too."""
    for path in sorted(folder.rglob("*.pt")):
        load_shard(path, map_location="cpu", mmap=True)
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: load_shard(path, map_location)     # instance attribute shadows it
    try:
        yield
    finally:
        del ce.load


def make_deepspeed_trainer(base: type, cfg: Config, progress: bool = True):
    """``base`` (the objective's Trainer class) running on a DeepSpeed engine."""
    return type(f"DeepSpeed{base.__name__}", (DeepSpeedMixin, base), {})(cfg, progress)


class DeepSpeedMixin:
    def __init__(self, cfg: Config, progress: bool = True):
        deepspeed = require("deepspeed", "deepspeed", f"deepspeed.stage={cfg.deepspeed.stage}")

        dist.init_process_group(cfg.deepspeed.timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        if self.world > 1:      # a hung or dead peer ends this rank within timeout_s (gloo's own timeout may not)
            watchdog.install(cfg.deepspeed.timeout_s, self.rank)
        super().__init__(cfg, progress=progress and self.is_main)
        t = cfg.train
        self.noise = torch.Generator().manual_seed(dist.rank_seed(t.seed, self.rank))
        self.zero3 = cfg.deepspeed.stage == 3
        if self.zero3:
            self._prepare_zero3()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                                 config=engine_config(cfg, self.world))
        # the same torch schedule, over the AdamW that steps the fp32 tensors; optimizer_step also copies its lr
        # into the engine's groups (learning_rate()), so DeepSpeed runs the single-process lr sequence
        self.scheduler = build_scheduler(reshard.inner_optimizer(self.engine), cfg)
        self._rebind_teacher(deepspeed)

    def build_transformer(self, weights: Config, plan, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """assemble's hook. ZeRO-3 on a pretrained diffusers folder: each rank builds and reads only its slices
        (zero3.build_partitioned), never the whole model, and full fine-tuning's teacher copies those slices
        (``copy_transformer``). A random base is drawn whole on the CPU with the seed, as the single-process run
        draws it, and the engine partitions it."""
        pretrained = weights.model.pretrained
        if weights.deepspeed.stage != 3 or pretrained is None or not Path(pretrained).is_dir():
            return construct_transformer(weights, plan, dtype, device)
        ds_config = engine_config(weights, self.world)
        self._build_partitioned = lambda: zero3.partitioned_module(plan.family, plan.arch, dtype, ds_config)
        return zero3.build_partitioned(plan.family, plan.arch, Path(pretrained), dtype, ds_config)

    _build_partitioned = None       # set by build_transformer when it built the transformer partitioned

    def copy_transformer(self, model: torch.nn.Module) -> torch.nn.Module:
        """assemble's hook: full fine-tuning's teacher. A partitioned build's copy is a second partitioned module
        with the student's slices (zero3.copy_partitioned); a whole one's, a deep copy the engine partitions."""
        if self._build_partitioned is None:
            return copy.deepcopy(model)
        return zero3.copy_partitioned(model, self._build_partitioned)

    @property
    def role_models(self) -> list[torch.nn.Module]:
        """The roles' modules: one under LoRA, student and teacher under full fine-tuning."""
        return list(dict.fromkeys((self.roles.student_model, self.roles.teacher_model)))

    def _prepare_zero3(self) -> None:
        for model in self.role_models:
            zero3.discover_parameters_in(model, "encode_context")
        self.all_gathers = zero3.AllGatherCounter.install()

    def _rebind_teacher(self, deepspeed) -> None:
        """The engine moves (ZeRO-3: partitions) the model: point the EMA at the parameters the model holds now."""
        ema, params = self.roles.ema, dict(self.model.named_parameters())
        student = list(self.roles.trainable.values())
        if isinstance(self.roles, FullRoles):
            if self.zero3:
                # the teacher partitioned as the student is, with DeepSpeed's gathering hooks: an engine without
                # optimizer (ZeRO-3 "inference"); kept so the hooks' owner lives as long as the trainer
                self.teacher_engine, *_ = deepspeed.initialize(model=self.roles.teacher_model,
                                                               config=engine_config(self.cfg, self.world))
            else:
                self.roles.teacher_model.to(self.engine.device)
            params = dict(self.roles.teacher_model.named_parameters())
        teacher = [params[n] for n in ema.names]
        if self.zero3:      # each rank's teacher slices follow its slices of the student's fp32 master
            self.roles.ema = zero3.PartitionedEMA(ema.names, teacher, zero3.master_slices(self.optimizer, student))
        else:
            self.roles.ema = EMATeacher(dict(zip(ema.names, teacher)), student)

    # ------------------------------------------------------------------ one iteration
    def backward(self, loss: Tensor) -> None:
        if self.zero3:
            # ZeRO-3 accumulates into its gradient partitions from the second backward after a step on, counting
            # backwards in engine.forward(), which the roles never call (they run the module itself)
            self.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)      # dopsd_step already divides by K (and grad_accum)

    @property
    def loss_weight(self) -> float:
        """The engine's gradients cannot be divided after the fact (partitioned, reduced in step()): each of the
        step's optim.grad_accum iterations weighs its backwards by 1 / grad_accum instead (dopsd_step ``weight``)."""
        return 1.0 / self.cfg.optim.grad_accum

    def average_gradients(self, n: int) -> None:
        """Nothing to do: every iteration's gradient was weighted by 1 / n (``loss_weight``)."""

    def forward_backward_step(self, batch):
        if self.zero3 and self.micro_batch == 0:     # the first of the step's optim.grad_accum iterations
            self.all_gathers.take()      # the step's all-gathers: roll-out(s), optimizer step, EMA
            # ZeRO-3 copies a gradient into its partition in the first backward after a step and adds to it in
            # later ones; the caption path's parameters get theirs only in the last backward, so every partition
            # must start the step at zero, not at the previous step's gradient
            self.optimizer.grad_partitions_flat_buffer.zero_()
        gather_once = self.zero3 and self.cfg.deepspeed.gather_once
        with watchdog.guard(f"step {self.step + 1}'s forward/backward"), \
                zero3.gathered_once(*self.role_models) if gather_once else contextlib.nullcontext():
            out = super().forward_backward_step(batch)
        # logged numbers are the global batch's: mean losses over ranks, summed FLOPs and tokens
        anchor = [] if out.anchor_loss is None else [out.anchor_loss]
        mean = dist.mean_over_ranks([out.loss, *out.losses, out.flops, out.flops_verl_omni, out.tokens, *anchor])
        if anchor:
            out.anchor_loss = mean.pop()
        out.loss, out.losses = mean[0], mean[1:-3]
        out.flops, out.flops_verl_omni = mean[-3] * self.world, mean[-2] * self.world
        out.tokens = round(mean[-1] * self.world)
        return out

    def optimizer_step(self, loss: float = 0.0) -> float | None:
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Every rank decides alike: ``loss`` is the mean over ranks (forward_backward_step), DeepSpeed's grad norm
        # and overflow check are global, and ZeRO-0's reduced gradients are the same on every rank. A skipped
        # update still runs engine.step() (it drops the accumulated gradients), with AdamW's own step left out.
        skip = not math.isfinite(loss)
        with watchdog.guard(f"step {self.step + 1}'s optimizer step"), \
                finite.inner_step_guard(self.engine.basic_optimizer, skip, self.cfg.deepspeed.stage == 0) as inner:
            self.engine.step()
        norm = self.engine.get_global_grad_norm()      # None on ZeRO-0 in fp32: DeepSpeed clips without reporting it
        norm = None if norm is None else float(norm)
        if not inner["ran"] and not skip and (norm is None or math.isfinite(norm)):
            norm = float("nan")     # dropped for a non-finite gradient (DeepSpeed's overflow check, or ZeRO-0's)
        if not self.bad_steps.check(loss, norm):
            if inner["ran"]:        # only where deepspeed.extra turned DeepSpeed's overflow check off
                raise finite.TrainingDiverged(f"step {self.step + 1}: DeepSpeed applied an update with grad norm "
                                              f"{norm}; keep bf16.check_grad_overflow on (deepspeed.extra)")
            return norm
        self.roles.update_teacher(self.cfg.method.ema_decay)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def _whole_student(self) -> dict[str, Tensor]:
        params = self.roles.trainable
        if not self.zero3:
            return dict(params)
        return dict(zip(params, zero3.gather_full(list(params.values()), [p.ds_tensor for p in params.values()])))

    def _rng_state(self) -> dict[str, Tensor]:
        return {"noise": self.noise.get_state(), "torch": torch.get_rng_state()}

    def save(self):
        root = self.checkpoint_root
        # fp32 masters and AdamW state as whole tensors by name (reshard.py), on rank 0, beside DeepSpeed's shards:
        # what a resume on another world size or ZeRO stage, or by the single-process trainer, reads
        with watchdog.guard(f"gathering the state of step {self.step}"):     # collectives: a dead peer ends us
            student, optim = reshard.gather_state(self.engine, self.roles.trainable, to=0)
            teacher = self.roles.ema.state_dict()                                          # ZeRO-3: collectives
        # rank 0 checks them and all ranks refuse together, before any file is written
        refused = None
        if self.is_main:
            try:
                ckpt.refuse_nonfinite_save(root / f"step-{self.step:06d}",
                                           {"student": student, "teacher": teacher, "optimizer": optim})
            except ckpt.CheckpointError as err:
                refused = err
        if dist.any_over_ranks(refused is not None):
            raise refused or ckpt.CheckpointError(f"{root / f'step-{self.step:06d}'}: not written: rank 0 found a "
                                                  "NaN or Inf tensor (its message names it)")
        try:        # a full or read-only disk: exit 2 naming the checkpoint (a peer still waiting ends by the watchdog)
            return self._write(root, student, teacher, optim)
        except ckpt.WRITE_ERRORS as err:
            raise ckpt.write_failed(root, self.step, err) from None

    def _write(self, root: Path, student: dict, teacher: dict, optim: dict) -> Path:
        if self.is_main:
            ckpt.begin_checkpoint(root, self.step)
        dist.barrier()
        tmp = ckpt.pending_dir(root, self.step)
        with watchdog.guard(f"the checkpoint of step {self.step}"):
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False,
                                        exclude_frozen_parameters=True)
        ckpt.save_tensors(tmp / f"rng-rank{self.rank:05d}.safetensors", self._rng_state())
        dist.barrier()
        final = root / f"step-{self.step:06d}"
        if self.is_main:
            ckpt.save_tensors(tmp / "student.safetensors", student)
            ckpt.save_tensors(tmp / "teacher.safetensors", teacher)
            ckpt.save_tensors(tmp / "optimizer.safetensors", optim)
            files = self.lora_files(student)        # from the whole student: finite, as checked above
            for name, (tensors, header) in files.items():
                ckpt.save_file_with_header(tmp / name, tensors, header)
            state = {"step": self.step, "data": self.stream.state_dict(), "world_size": self.world,
                     "param_groups": self._param_groups(), "scheduler": scheduler_state(self.scheduler),
                     "config": self.cfg.to_dict(), "bad_steps": self.bad_steps.state_dict()}
            final = ckpt.publish_checkpoint(root, self.step, state, self.cfg.train.keep_last)
            self.publish_lora(final, files)
        dist.barrier()
        return final

    def _param_groups(self) -> list[dict]:
        """AdamW's hyper-parameters in the single-process trainer's state.json form (one group, indices by name)."""
        group = {k: v for k, v in reshard.inner_optimizer(self.engine).param_groups[0].items() if k != "params"}
        return [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()},
                 "params": list(range(len(self.roles.trainable)))}]

    def load(self, path) -> list[str]:
        state = ckpt.read_state(path, required=("step", "data", "config"))
        changes = ckpt.resume_changes(path, state["config"], self.cfg)
        # A single-process checkpoint has no world_size; DeepSpeed's shards fit only their own world size and stage
        # (it fails on another stage's with a bare assert), so any other layout resumes from the safetensors files
        was = state.get("world_size", 1), state["config"].get("deepspeed", {}).get("stage")
        if was != (self.world, self.cfg.deepspeed.stage):
            self._load_resharded(path, state, *was)
        else:
            self._load_shards(path)
        self.stream.load_state_dict(state["data"])     # the global stream's: a position in samples, any world size
        self.step = int(state["step"])
        load_scheduler(self.scheduler, state.get("scheduler"), self.step, path / "state.json")
        self.bad_steps.load_state_dict(state.get("bad_steps"), path / "state.json")
        return changes

    def _load_shards(self, path: Path) -> None:
        with load_shards_safely(self.engine, path / "deepspeed"):
            loaded, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag="engine", load_module_strict=False,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise ckpt.CheckpointError(f"{path / 'deepspeed'}: DeepSpeed could not load its shards")
        ckpt.refuse_nonfinite_load(path / "deepspeed", self._whole_student())        # ZeRO-3: every rank gathers
        self.roles.ema.load_state_dict(ckpt.load_tensors(path / "teacher.safetensors", self.roles.ema.state_dict()))
        self._load_rng(path / f"rng-rank{self.rank:05d}.safetensors")

    def _load_rng(self, file: Path) -> None:
        rng = ckpt.load_tensors(file, self._rng_state())
        self.noise.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])

    def _load_resharded(self, path: Path, state: dict, world: int, stage: int | None) -> None:
        """Resume a checkpoint of ``world`` ranks on ZeRO-``stage`` (None: the single-process trainer) on this run's
        world size and stage: student (fp32 masters), EMA teacher and AdamW state from the safetensors files, each
        rank taking its own fragments (reshard.py), then gathered back and compared with the files."""
        was = f"{world} rank(s) on " + ("the single-process trainer" if stage is None else f"ZeRO-{stage}")
        if not (path / "optimizer.safetensors").is_file():
            raise ckpt.CheckpointError(f"{path}: written by {was} without optimizer.safetensors (an older version): "
                                       f"resume it with {world} rank(s) and deepspeed.stage={stage}, or start a new "
                                       "output_dir")
        params = self.roles.trainable
        shapes = {n: torch.empty(reshard.whole_shape(p), device="meta") for n, p in params.items()}
        student = ckpt.load_tensors(path / "student.safetensors", shapes)
        teacher = ckpt.load_tensors(path / "teacher.safetensors", self.roles.ema.state_dict())   # ZeRO-3: collective
        optim = ckpt.load_tensors(path / "optimizer.safetensors")
        problem = reshard.state_problem(shapes, optim)
        if problem:
            raise ckpt.CheckpointError(f"{path / 'optimizer.safetensors'}: {problem}; the file was edited or not "
                                       "written by this run's `dopsd train`: resume from an earlier checkpoint")
        reshard.scatter_state(self.engine, params, student, optim)
        self.roles.trainable_changed()
        self.roles.ema.load_state_dict(teacher)
        master, back = reshard.gather_state(self.engine, params, to=0)       # every rank: collectives
        ema = self.roles.ema.state_dict()                                    # ZeRO-3: collective
        bad = None
        if self.is_main:
            bad = next((k for k in [*student, *optim]
                        if not torch.equal((master | back)[k].float(), (student | optim)[k].float())), None)
            bad = bad or next((f"teacher {k}" for k in teacher if not torch.equal(ema[k].cpu(), teacher[k].float())),
                              None)
            bad = bad or (None if back.keys() == optim.keys() else "the optimizer's keys")
        if dist.any_over_ranks(bad is not None):
            raise ckpt.CheckpointError(f"{path}: resharding from {was} to {self.world} rank(s) on ZeRO-"
                                       f"{self.cfg.deepspeed.stage} does not give back {bad or 'what rank 0 read'}")
        # the noise of a rank the checkpoint had continues; a new rank's is drawn from its seed and the step
        own, single = path / f"rng-rank{self.rank:05d}.safetensors", path / "rng.safetensors"
        if own.is_file() or (self.rank == 0 and single.is_file()):
            self._load_rng(own if own.is_file() else single)
        else:
            self.noise.manual_seed(dist.rank_seed(self.cfg.train.seed, self.rank) + 7919 * int(state["step"]))
        if self.is_main:
            print(f"{path}: resharded from {was} to {self.world} rank(s) on ZeRO-{self.cfg.deepspeed.stage} "
                  "(student, teacher and optimizer state gathered back and checked)")

    def _write_run_files(self) -> None:
        if self.is_main:
            super()._write_run_files()
        dist.barrier()

    # ------------------------------------------------------------------ samples (every rank calls; rank 0 samples)
    def whole_weights(self):
        """Every rank enters; inside, rank 0 alone may run the model (ZeRO-3: gathered, hooks set aside)."""
        return zero3.whole_weights(*self.role_models) if self.zero3 else contextlib.nullcontext()

    def sample_student(self, prompts, sigmas, seed=None):
        with self.whole_weights():
            return super().sample_student(prompts, sigmas, seed) if self.is_main else None

    def sample_grid(self, path, before=None):
        with self.whole_weights():
            return super().sample_grid(path, before) if self.is_main else path
