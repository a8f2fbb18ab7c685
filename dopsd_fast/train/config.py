"""Typed training configuration: YAML preset + ``--set a.b=c`` overrides, validated before anything is built.

Every section is a dataclass; unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # z_image: Z-Image-Turbo (S3-DiT); flux2_klein: FLUX.2 [klein] 4B/9B (models/adapter.py bundles the differences).
    family: Literal["z_image", "flux2_klein"] = "z_image"
    # Diffusers-format transformer folder, or a Hugging Face id `owner/name[@revision]` (its transformer/ folder,
    # fetched into the HF cache: models/hub.py); None builds random weights from `arch` (tiny/test models).
    pretrained: str | None = None
    # Z-Image text encoder / tokenizer / VAE folders (context.kind=qwen3, latent data); null: the siblings of
    # `pretrained` in a diffusers download (text_encoder/, tokenizer/, vae/). A Hub id names that folder of a repo.
    text_encoder: str | None = None
    tokenizer: str | None = None
    vae: str | None = None
    # The family's config overrides (ZImageConfig {dim: 64, ...}, Flux2KleinConfig {num_layers: 1, ...});
    # keys are checked when the plan is resolved.
    arch: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["fp32", "bf16"] = "fp32"
    # What each transformer block keeps for its backward (models/checkpointing.py): none = everything autograd saves;
    # full = its inputs, the forward rerun in the backward; selective = its GEMM and attention outputs, norms and
    # elementwise ops rerun; auto = full on the fewest blocks that fit train.memory_budget_gb, sized from the first
    # iteration (run fully checkpointed) and logged.
    checkpointing: Literal["full", "selective", "none", "auto"] = "none"
    init_seed: int = 0
    # Fused-op implementation: auto = per op, what the op bench measured fastest on the device (ours or PyTorch's;
    # ops/_dispatch.py CUDA_AUTO, and CPU_AUTO: the C++ epilogues on CPU, the PyTorch reference for the rest); cpp
    # forces the csrc/ extension where an op has one (DOPSD_BACKEND too).
    ops_backend: Literal["auto", "cpp", "triton", "reference"] = "auto"
    # blocks = torch.compile each transformer block (models/compile.py: regional, dynamic shapes; Inductor's fused
    # kernels cut the per-launch host overhead that dominates small images; equal to none up to fp32 rounding; the
    # first iterations compile, ~5 variants per block class); none = eager.
    compile: Literal["none", "blocks"] = "none"
    # LoRA files folded into the base weights, in order, before the adapters are injected (W += alpha / r * B A,
    # each file's own rank and alpha; models/lora_load.py merge_loras): how a continual plan's stage starts on
    # the earlier stages under `between: merge` (train/continual.py). A .safetensors file or a folder holding
    # pytorch_lora_weights.safetensors, diffusers names.
    merge_loras: list[str] = field(default_factory=list)
    # The frozen base of the LoRA linears (adapter.targets; the other linears, norms and embedders keep model.dtype).
    # bf16: model.dtype as loaded. fp8: e4m3 weights with one fp32 scale per output row, quantised once at load (half
    # of bf16's bytes), shared by teacher and student; forward GEMMs through torch._scaled_mm on CUDA sm89+ with the
    # activations quantised per row on the fly, an fp32 emulation with the same rounding elsewhere
    # (ops/fp8_linear.py). LoRA, attention, the loss and the optimizer stay bf16/fp32. LoRA roles only.
    base_precision: Literal["bf16", "fp8"] = "bf16"
    # fp8 base: the student's input-gradient GEMM dX = dY W in bf16 (on the dequantised weight) or with dY quantised
    # per row to e5m2. bf16 until scripts/device_check.sh has measured both.
    fp8_input_grad: Literal["bf16", "e5m2"] = "bf16"


IMAGE_KINDS = ("folder", "webdataset")      # data.kind values that read real images (aspect buckets, the VAE)


@dataclass
class DataConfig:
    # synthetic: procedural shapes (embedded default); folder: images with caption sidecars at `path`;
    # webdataset: a folder of uncompressed .tar shards at `path` (KEY.jpg + KEY.txt/.json; data/shards.py);
    # world: the miniature world's new-concept pairs (dopsd_fast/world, `dopsd demo`); `path` names the concept
    # (zorp, wug or fep: world/scene.py CONCEPTS; null: zorp).
    kind: Literal["synthetic", "folder", "webdataset", "world"] = "synthetic"
    path: str | None = None
    num_pairs: int = 4          # synthetic only
    image_size: int = 32
    seed: int = 0
    # folder, webdataset: aspect-ratio buckets around image_size^2 (odd; 1 = square crops only)
    buckets: int = 11
    # Processes that decode and resize this rank's images ahead of training (torch DataLoader workers, 2 batches
    # each, pinned memory on CUDA); 0 decodes in the training process. auto: 0 on the CPU (a worker would take a core
    # from training), on CUDA min(4, the rank's share of the cores - 1) (build.data_workers). Batches are the same.
    num_workers: int | Literal["auto"] = "auto"
    # Encoder-output cache (student text, teacher multimodal features, VAE latents), keyed by content and encoder:
    # "auto" = $XDG_CACHE_HOME/dopsd_fast (~/.cache/dopsd_fast), a folder, or null for none.
    cache_dir: str | None = "auto"
    # With a cache, a training run loads an encoder (Qwen3 text, Qwen3-VL teacher, VAE) only to compute an entry
    # the cache lacks, so after `dopsd cache CONFIG` (which also caches validation.prompts) none is loaded. true
    # (default): a miss loads its encoder onto train.device and is encoded and cached during training. false: none
    # is ever loaded onto train.device (a card that holds only the transformer, e.g. zimage-turbo-lora-24gb); a
    # missing entry stops the run at start-up (exit 2, naming the file) and sample grids decode on a VAE loaded on
    # the CPU. No cache (null): every encoder loads up front and runs every batch.
    encode_missing: bool = True


@dataclass
class ContextConfig:
    # toy: frozen hashed-word text encoder + patch image encoder sharing its word table (CPU default);
    # its feature size is model.arch.cap_feat_dim.
    # world: the miniature world's tiny Qwen3 LM and its multimodal twin (shipped weights; needs transformers).
    kind: Literal["toy", "qwen3", "world"] = "toy"
    max_text_tokens: int = 64
    # Teacher context order: the authors put the image first ([image, prompt]).
    teacher_order: Literal["image_first", "text_first"] = "image_first"
    # qwen3: the Qwen3-VL folder or Hub id (e.g. Qwen/Qwen3-VL-4B-Instruct) whose language model gets the text
    # encoder's weights; the teacher's token limit and the pixel range its target crop is resized into.
    teacher_model: str | None = None
    teacher_max_tokens: int = 1024
    teacher_min_pixels: int = 512 * 512
    teacher_max_pixels: int = 768 * 768
    # The prompt text inside the VLM teacher's user turn. templated (the released recipe): the student's
    # chat-templated string ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"), because the released
    # loop's _encode_prompt rewrites the prompt list in place before the teacher reads it (method.md section 6);
    # raw: the prompt itself, what the paper describes. Moves per-iteration losses by up to ~3%.
    teacher_prompt: Literal["templated", "raw"] = "templated"
    # Teacher's privileged context. vlm: multimodal encoder features of [image, prompt] replace the text features;
    # reference (FLUX.2 klein only, the authors' edit branch): text of "<prompt> <reference_prompt>" plus the
    # target's clean latents as reference tokens (RoPE time id 10), output sliced back to the target.
    teacher: Literal["vlm", "reference"] = "vlm"
    reference_prompt: str = ("Make the main subject (facial/ip details), background, and overall composition "
                             "consistent with the reference image.")


@dataclass
class AdapterConfig:
    mode: Literal["lora", "full"] = "lora"
    rank: int = 64
    alpha: float = 128.0
    # Module-name suffixes that get LoRA; the official Z-Image set (also hits the refiners).
    targets: list[str] = field(default_factory=lambda: [
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"])
    # Start student and EMA teacher from an existing LoRA (continual tuning): a local .safetensors file, or a
    # folder holding pytorch_lora_weights.safetensors, in diffusers/PEFT or ComfyUI names (models/lora_load.py).
    # Its rank and alpha must be `rank` and `alpha`; modules it does not adapt start fresh. null: a fresh adapter.
    # Hugging Face ids are not resolved yet: download the LoRA and pass its local path.
    init_from: str | None = None


@dataclass
class MethodConfig:
    objective: Literal["dopsd", "sft"] = "dopsd"
    loss: Literal["x0", "velocity"] = "x0"
    # Roll-out noise levels sigma_0 = 1 > ... > sigma_{K-1}; sigma_K = 0 is implied.
    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.75, 0.5])
    ema_decay: float = 0.9999
    # Backpropagate each step's loss/K at once (one live student graph) instead of K graphs to the end.
    per_step_backward: bool = True
    # SFT baseline: sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1).
    sft_shift: float = 3.0
    # fixed: roll out on `sigmas`; model: on the model's own sampler schedule with `steps` steps, per image size
    # (FLUX.2 klein: empirical mu, the authors' scheduler(4, mu); Z-Image: shift `sample.shift`).
    schedule: Literal["fixed", "model"] = "fixed"
    steps: int = 4
    # Self-distillation anchor (README, "Continual tuning"): every iteration also rolls the student out on
    # `anchor_per_iteration` of `anchor_prompts` (ordinary captions, not the concept's) and regresses it onto the
    # EMA teacher given the same text-only context. On-policy and data-free, it keeps what the model draws for other
    # prompts (without it D-OPSD pulls them toward the concept: toy-world-notes 5.4). 0: off, the authors' recipe.
    anchor_prompts: list[str] = field(default_factory=list)
    anchor_per_iteration: int = 0


@dataclass
class OptimConfig:
    # adamw: torch's AdamW, fp32 moments (8 bytes per trainable value). adamw8bit: torchao's AdamW8bit (the [lowbit]
    # extra): the moments of tensors of >= 4096 values held as 8-bit block-quantised codes (~2 bytes per value), the
    # weights fp32 as ever; single-process runs (train/optim.py says why torchao).
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Learning rate of optimizer step s (0-based; torch.optim.lr_scheduler.LambdaLR, stepped once per optimizer
    # step, its state in each checkpoint): lr * (s + 1) / warmup_steps during the warm-up, then constant, or
    # decaying from lr over the remaining D = train.steps - warmup_steps steps, linearly (linear: lr * (D - d) / D at
    # the d-th of them) or along a half cosine (cosine: lr * (1 + cos(pi d / D)) / 2), so the last step's lr is small
    # but not 0 (train/optim.py). A resume that raises train.steps stretches the decay from the step it resumes at.
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    # Gradients of this many iterations (batches of train.batch_size, each with its K + 1 backwards) are averaged
    # before one clip + AdamW step + EMA update. A "step" (train.steps, checkpoint_every, log_every, metrics rows,
    # the schedule) is one optimizer step, i.e. grad_accum batches (per rank under DeepSpeed).
    grad_accum: int = 1


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 1
    seed: int = 30
    output_dir: str = "outputs/run"
    log_every: int = 1
    checkpoint_every: int = 500
    keep_last: int = 3
    # "auto": continue from the newest checkpoint in output_dir if there is one; or a checkpoint path; or null.
    resume: str | None = "auto"
    # A step whose loss or gradient norm is NaN/Inf updates nothing (AdamW, EMA; the step still counts, its batch
    # and noise are used up) and is logged "skipped": true; this many such steps IN A ROW end the run with
    # TrainingDiverged, `dopsd train` exit code 3 (train/finite.py), before that step's checkpoint is written.
    # Consecutive, not total: an isolated bad batch is survivable, a diverged model never recovers by itself and
    # three steps tell it from noise. The run's total is in metrics.jsonl ("bad_steps") and the checkpoints.
    max_bad_steps: int = 3
    # Where global rank 0 sends each step's row (train/metrics.py): jsonl = <output_dir>/metrics.jsonl (the run's own
    # record: a resume trims it, the loss-curve PNG is drawn from it); tensorboard = event files in
    # <output_dir>/tensorboard (the [telemetry] extra; without it a run warns once: telemetry.open_tensorboard);
    # wandb = a Weights & Biases run (the [wandb] extra, an error without it; train/wandb_sink.py), configured by
    # wandb's own WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE / WANDB_DIR variables, resumed with the run.
    report_to: list[Literal["tensorboard", "wandb", "jsonl"]] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    # Per-device dense bf16 peak for MFU; null: looked up from the GPU's name (no MFU on CPU).
    peak_tflops: float | None = None
    # Where the transformer, encoders and VAE run: "auto" = this process's GPU (LOCAL_RANK under a launcher) when
    # CUDA is available, else the CPU; or "cpu", "cuda", "cuda:N".
    device: str = "auto"
    # GiB model.checkpointing=auto may plan for (weights, gradients, optimizer state, EMA, activations);
    # null: the CUDA device's total memory (a CPU run must give one).
    memory_budget_gb: float | None = None
    # LoRA files written into every checkpoint folder beside the training state, and into output_dir at the end:
    # diffusers = pytorch_lora_weights.safetensors (diffusers/PEFT, the pipelines' load_lora_weights), comfyui =
    # lora_comfyui.safetensors (ComfyUI's model names). The student's adapter, in its own fp32, as `dopsd export`
    # writes it. [] or adapter.mode=full: none (`dopsd export --format full` writes full weights).
    export_formats: list[Literal["diffusers", "comfyui"]] = field(default_factory=lambda: ["diffusers"])


@dataclass
class DeepSpeedConfig:
    # ZeRO stage under DeepSpeed; null runs the single-process trainer. 0: data parallel; 1: optimizer states
    # sharded; 2: + gradients (the authors' setting); 3: + parameters (full fine-tuning: the EMA teacher's too, each
    # rank keeping the fp32 EMA of its own slices). Launch with torchrun or `deepspeed`.
    stage: int | None = None
    # ZeRO-3: gather every parameter once per iteration for all K steps of both roles (one coalesced all-gather),
    # instead of around every forward and backward; costs the whole model's memory during the roll-out.
    gather_once: bool = True
    # Seconds a collective waits for a peer before this rank fails: a dead or hung rank ends the whole job (exit 76,
    # train/watchdog.py). Also the longest one step's forward/backward or optimizer step may take on any rank.
    timeout_s: float = 600.0
    # Time every collective for the `communication` column (synchronises after each one, costing overlap).
    comm_timing: bool = True
    # Raw DeepSpeed config merged last, e.g. {zero_optimization: {stage3_param_persistence_threshold: 0}}.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleConfig:
    # Few-step sampler of the turbo model: sigma = shift*s/(1+(shift-1)*s), s = linspace(1, 1/N, N), then 0.
    steps: int = 8
    shift: float = 3.0
    prompts: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class ValidationConfig:
    # A labelled grid <output_dir>/validation/step-NNNNNN.png every `every` steps and at the last step (0: off).
    # Rows: target | base (adapters off / untouched weights, text) | EMA teacher (text + target) | student (text).
    every: int = 0
    # Columns: the first N data pairs (their caption variant 1), or a list of pair indices; then `prompts`, free
    # text without a target (base and student tiles only).
    pairs: int | list[int] = 4
    prompts: list[str] = field(default_factory=list)
    seed: int = 0               # every row starts from the same noise, so grids of different steps compare
    # Sampler steps; null: the family's few-step inference schedule (Z-Image-Turbo 8, FLUX.2 [klein] 4).
    steps: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- typed conversion

_SCALARS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        if tp is float and isinstance(value, str):      # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        accepted = (int, float) if tp is float else tp
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{key}: expected {_SCALARS[tp]}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value) if tp is float else value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


# Keys of older configs -> what became of them: a config naming one fails with the message (clearer than "did you
# mean"); a checkpoint whose saved config names one still resumes (checkpoint.resume_changes ignores them).
RETIRED = {
    "model.gradient_checkpointing": "was replaced by model.checkpointing: full | selective | none | auto "
                                    "(gradient_checkpointing: true is checkpointing: full, false is none)",
    # One forward of teacher and student rows put the teacher rows in the student's autograd graph: 1.90x the
    # time and 1.96x the saved activations of the two forwards (bench/results/2026-11-26-cpu-bench-step-packed.json).
    "method.packed_forward": "was removed: teacher and student always run as two forwards (the packed one was "
                             "slower and held twice the activations); delete the key",
    "train.tensorboard": "was replaced by train.report_to, a list of tensorboard | wandb | jsonl (tensorboard: true "
                         "is report_to: [tensorboard, jsonl], false is [jsonl])",
}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            if where in RETIRED:
                raise ConfigError(f"'{where}' {RETIRED[where]}")
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{where}'{hint}; valid keys here: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------- semantic checks

def anchor_prompts(cfg: Config) -> list[str]:
    """The captions the self-distillation anchor draws from; none when it is off."""
    m = cfg.method
    return [p for p in m.anchor_prompts if p.strip()] if m.anchor_per_iteration else []


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> Config:
    m, o, t, a = cfg.method, cfg.optim, cfg.train, cfg.adapter
    s = m.sigmas
    _check(len(s) >= 1, "method.sigmas", "needs at least one roll-out step")
    _check(all(0.0 < x <= 1.0 for x in s), "method.sigmas", f"every sigma must be in (0, 1], got {s}")
    _check(all(x > y for x, y in zip(s, s[1:])), "method.sigmas", f"must be strictly decreasing, got {s}")
    _check(0.0 <= m.ema_decay < 1.0, "method.ema_decay", f"must be in [0, 1), got {m.ema_decay}")
    _check(m.sft_shift > 0, "method.sft_shift", "must be > 0")
    _check(m.anchor_per_iteration >= 0, "method.anchor_per_iteration", "must be >= 0 (0: no anchor)")
    _check(not m.anchor_per_iteration or m.objective == "dopsd", "method.anchor_per_iteration",
           "the self-distillation anchor is D-OPSD's; SFT keeps ordinary prompts by training on ordinary pairs")
    _check(not m.anchor_per_iteration or anchor_prompts(cfg), "method.anchor_prompts",
           "the anchor needs ordinary captions to draw from, e.g. --set 'method.anchor_prompts=[\"a red car\", ...]'")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"need two values in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.scheduler == "constant" or o.warmup_steps < t.steps, "optim.warmup_steps",
           f"must be < train.steps ({t.steps}) with optim.scheduler={o.scheduler}, which decays after the warm-up")
    _check(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {o.grad_accum}")
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _check(bool(t.output_dir.strip()), "train.output_dir",
           "must name a folder (an empty path would write the run into the current directory), e.g. outputs/run")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _check(a.rank >= 1, "adapter.rank", "must be >= 1")
    _check(a.alpha > 0, "adapter.alpha", "must be > 0")
    _check(a.mode == "full" or len(a.targets) > 0, "adapter.targets", "LoRA mode needs at least one target")
    _check(a.init_from is None or a.mode == "lora", "adapter.init_from",
           "starts LoRA adapters, but adapter.mode=full trains all weights; set adapter.mode=lora, or merge the LoRA "
           "into the base weights first and point model.pretrained at them")
    _check(a.init_from is None or bool(a.init_from.strip()), "adapter.init_from",
           "must name a LoRA .safetensors file or a folder holding pytorch_lora_weights.safetensors (or be null)")
    _check(all(p.strip() for p in cfg.model.merge_loras), "model.merge_loras",
           "lists an empty path; each entry is a LoRA .safetensors file or a folder holding pytorch_lora_weights.safetensors")
    _check(len(set(t.export_formats)) == len(t.export_formats), "train.export_formats",
           f"lists a format twice: {t.export_formats}")
    _check(len(set(t.report_to)) == len(t.report_to), "train.report_to", f"lists a sink twice: {t.report_to}")
    _check(cfg.data.num_pairs >= 1, "data.num_pairs", "must be >= 1")
    _check(cfg.data.num_workers == "auto" or cfg.data.num_workers >= 0, "data.num_workers",
           f"must be >= 0 or auto, got {cfg.data.num_workers}")
    _check(cfg.data.kind not in IMAGE_KINDS or bool(cfg.data.path), "data.path",
           f"data.kind={cfg.data.kind} needs data.path (a folder of images, or of .tar shards for webdataset)")
    _check(cfg.data.image_size % 16 == 0 and cfg.data.image_size > 0, "data.image_size",
           f"must be a positive multiple of 16, got {cfg.data.image_size}")
    _check(cfg.sample.steps >= 1, "sample.steps", "must be >= 1")
    _check(cfg.context.max_text_tokens >= 1, "context.max_text_tokens", "must be >= 1")
    _check(cfg.data.buckets >= 1 and cfg.data.buckets % 2 == 1, "data.buckets",
           f"must be odd (one square bucket + pairs of orientations), got {cfg.data.buckets}")
    c = cfg.context
    _check(c.teacher_max_tokens >= 1, "context.teacher_max_tokens", "must be >= 1")
    _check(0 < c.teacher_min_pixels <= c.teacher_max_pixels, "context.teacher_min_pixels",
           "must be > 0 and <= context.teacher_max_pixels")
    _check(cfg.sample.shift > 0, "sample.shift", "must be > 0")
    _check(t.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", t.device) is not None, "train.device",
           f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    _check(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", "must be > 0 (or null to look it up)")
    _check(t.memory_budget_gb is None or t.memory_budget_gb > 0, "train.memory_budget_gb",
           f"must be > 0 GiB (or null: the CUDA device's memory), got {t.memory_budget_gb}")
    ds = cfg.deepspeed
    _check(ds.stage in (None, 0, 1, 2, 3), "deepspeed.stage", f"must be null, 0, 1, 2 or 3, got {ds.stage}")
    _check(ds.timeout_s > 0, "deepspeed.timeout_s", "must be > 0")
    _check(ds.stage is None or cfg.model.checkpointing != "auto", "model.checkpointing",
           "auto sizes its plan from the tensors this process holds, which a DeepSpeed engine partitions and owns: "
           "use full, selective or none with deepspeed.stage")
    _check(ds.stage != 3 or cfg.model.compile == "none", "model.compile",
           "blocks is untested under ZeRO-3's parameter gathering hooks: use model.compile=none with deepspeed.stage=3")
    _check(ds.stage is None or o.name == "adamw", "optim.name",
           "adamw8bit runs single-process only (DeepSpeed's ZeRO optimizers step flat fp32 partitions, not the "
           "per-tensor 8-bit state): use optim.name=adamw with deepspeed.stage")
    _check(ds.stage is None or m.objective == "dopsd", "deepspeed.stage",
           "the DeepSpeed engine trains method.objective=dopsd; run the SFT baseline without deepspeed.stage")
    _check(m.steps >= 1, "method.steps", "must be >= 1")
    v = cfg.validation
    _check(v.every >= 0, "validation.every", f"must be >= 0 (0 turns validation off), got {v.every}")
    _check(v.pairs >= 0 if isinstance(v.pairs, int) else all(i >= 0 for i in v.pairs), "validation.pairs",
           f"a count >= 0 or a list of pair indices >= 0, got {v.pairs}")
    _check(v.every == 0 or v.pairs != 0 and v.pairs != [] or bool(v.prompts), "validation.pairs",
           "validation.every > 0 needs at least one column: pairs > 0 or validation.prompts")
    _check(v.steps is None or v.steps >= 1, "validation.steps", f"must be >= 1 (or null), got {v.steps}")
    _check(cfg.model.base_precision == "bf16" or a.mode == "lora", "model.base_precision",
           "fp8 quantises the frozen base under LoRA adapters, but adapter.mode=full trains every weight (which must "
           "stay bf16/fp32): set adapter.mode=lora or model.base_precision=bf16")
    _check(cfg.model.base_precision == "bf16" or ds.stage is None, "model.base_precision",
           "fp8 runs in the single-process trainer (DeepSpeed would cast the e4m3 weights to bf16 without their "
           "scales): remove deepspeed.stage or set model.base_precision=bf16")
    _check(cfg.model.fp8_input_grad == "bf16" or cfg.model.base_precision == "fp8", "model.fp8_input_grad",
           "e5m2 applies to an FP8 base only: set model.base_precision=fp8 too, or leave fp8_input_grad at bf16")
    _check(cfg.context.teacher != "reference" or cfg.model.family == "flux2_klein", "context.teacher",
           "reference needs reference-image tokens, which only model.family=flux2_klein has; use vlm")
    return cfg


# ---------------------------------------------------------------- loading

def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where (1-based line and column), without its echo of the text."""
    problem, mark = getattr(err, "problem", None) or str(err), getattr(err, "problem_mark", None)
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value of {key.strip()} is not valid YAML "
                          f"({_yaml_problem(err)}); quote it if it is a string") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:          # absent, or left empty in the YAML (`sample:`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``tiny-cpu`` -> ``configs/tiny-cpu.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("dopsd_fast.configs") / f"{p.stem}.yaml"
    # Only a bare name falls back to a shipped preset: a missing path with a folder in it is an error.
    if p.suffix in ("", ".yaml") and len(p.parts) == 1 and shipped.is_file():
        return Path(str(shipped))
    names = sorted(f.name[:-5] for f in resources.files("dopsd_fast.configs").iterdir() if f.name.endswith(".yaml"))
    raise ConfigError(f"config file {name_or_path!r} not found; pass a YAML path or a preset name: {', '.join(names)}")


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict[str, Any] = {}
    if name_or_path is not None:
        path = preset_path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}); fix the syntax there") from None
        if data is None or data == {}:      # every default is the 6B Z-Image-Turbo run: never what an empty file meant
            raise ConfigError(f"{path}: empty config (no sections); start from a preset, e.g. `dopsd train tiny-cpu` "
                              "or a copy of configs/zimage-turbo-lora.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
        try:
            # the file's own keys and types, so that an error there names the file (a section left empty, `sample:`,
            # may be filled by --set)
            _build(Config, {k: v for k, v in data.items() if v is not None}, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return validate(_build(Config, apply_overrides(data, list(overrides)), ""))
