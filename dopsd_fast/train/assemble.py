"""A run's parts, assembled once, in the order they are used: weights -> plan (architecture, model family) -> data ->
transformer -> roles -> contexts -> codec.

``assemble(cfg, use)`` is the one place a run is put together; ``use`` says what for, and so what is built:

* ``train`` (the Trainer, and the DeepSpeed trainer on each rank): everything; the checks that need no weights
  (buildable parts, the wandb extra, the initial LoRA file, the data, a cold cache) come before any weights load.
* ``sample`` (`dopsd sample`): the transformer and roles as trained, the student's context c_s and the codec; no
  data, no teacher context.
* ``export`` (`dopsd export`): the transformer and roles only, on the original base (not fp8, not compiled).

``fill_caches`` (`dopsd cache`) is the one other assembly: data, contexts and codec, no transformer.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ..models.adapter import ModelFamily
from ..models.compile import compile_blocks
from ..models.loading import WeightsError
from ..models.lora_load import lora_file, merge_loras, read_lora
from ..method.roles import Roles
from ..data.loader import BatchLoader
from . import checkpoint as ckpt
from .build import (DTYPES, Plan, build_contexts, build_data, build_roles, check_buildable, quantize_frozen_base,
                    resolve_arch, resolve_device, resolve_plan, resolve_weights)
from .build_qwen import build_codec, build_qwen_contexts, cache_root, check_cached, open_folder
from .config import IMAGE_KINDS, Config, ConfigError, anchor_prompts
from .memory import checkpoint_plan
from .wandb_sink import import_wandb

Use = Literal["train", "sample", "export"]


@dataclass
class Parts:
    """What ``assemble`` built; a part its ``use`` does not need is None."""
    cfg: Config                 # as written: what a run saves and compares on resume (Hub ids unresolved)
    plan: Plan                  # architecture, model family, parameter counts, roll-out sigmas
    dtype: torch.dtype
    device: torch.device
    model: nn.Module            # the transformer with the adapters injected (LoRA) or the student itself (full)
    roles: Roles                # student and teacher on it; trainable = what the optimizer steps
    base_state: dict[str, Tensor] | None = None     # train on a random base: its unmerged init (base.safetensors)
    dataset: Any = None                             # train
    stream: BatchLoader | None = None               # train: this rank's rows of each global batch
    text_encoder: Callable[[list[str]], list[Tensor]] | None = None    # c_s: train, sample
    mm_encoder: Callable | None = None              # c_t: train
    codec: Any = None                               # image <-> latent: train, sample

    @property
    def family(self) -> ModelFamily:
        return self.plan.family


def construct_transformer(weights: Config, plan: Plan, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The whole transformer on ``device``: random init (with the global seed, on the CPU) or model.pretrained."""
    if weights.model.pretrained is None:
        model = plan.family.build(plan.arch).to(dtype)
    else:
        model = plan.family.load(weights.model.pretrained, dtype)
    return model.to(device)      # before the roles: adapters, the EMA master and the optimizer follow it


def assemble(cfg: Config, use: Use = "train", *, rank: int = 0, world: int = 1, progress: bool = False,
             main: bool = True, base: Path | None = None, transformer: Callable = construct_transformer,
             copy_model: Callable = copy.deepcopy) -> Parts:
    """The parts of the run ``cfg`` that ``use`` needs, top to bottom.

    ``rank`` of ``world``: which rows of each global batch this process trains on; ``main``: whether it reports;
    ``base``: the run's base.safetensors, which a random base is read from (sample, export; train draws it);
    ``transformer(weights, plan, dtype, device)``: builds the transformer (``construct_transformer``, or the
    DeepSpeed trainer's); ``copy_model(model)``: full fine-tuning's teacher copy of it (the DeepSpeed trainer's
    ZeRO-3 copy is partitioned).
    """
    train = use == "train"
    weights = resolve_weights(cfg) if train else _weights_read_by(cfg, use)   # Hub ids -> local snapshot folders
    if train:
        check_buildable(weights)
        if "wandb" in cfg.train.report_to:
            import_wandb()          # a missing [wandb] extra fails before any weights load
    plan = resolve_plan(weights)
    init_lora = _init_lora_file(cfg)        # adapter.init_from (null for sample and export)
    dtype, dataset, stream = DTYPES[cfg.model.dtype], None, None
    if train:       # a folder with nothing usable, or a cache miss with data.encode_missing=false, fails here
        dataset, stream = build_data(cfg, rank, world, progress)
        check_cached(weights, plan.arch, plan.family, dtype, dataset)
    device = resolve_device(cfg.train.device)

    torch.manual_seed(cfg.model.init_seed)      # random base (tiny models) and LoRA init, drawn on the CPU
    model = transformer(weights, plan, dtype, device)
    if train:
        model.checkpointing = checkpoint_plan(cfg, device)
    base_state = _random_base(model, base) if cfg.model.pretrained is None else None
    merge_loras(model, cfg.model.merge_loras)       # after base_state: base.safetensors stays the unmerged init
    roles = build_roles(cfg, model, copy_model)
    if use != "export":         # export merges into the original weights; training and sampling run on fp8
        quantize_frozen_base(cfg, model)
    if init_lora is not None:
        start_from_lora(roles, model, init_lora, main)
    if use != "export":
        for m in dict.fromkeys((roles.student_model, roles.teacher_model)):    # after LoRA injection
            compile_blocks(m, cfg.model.compile)
    parts = Parts(cfg, plan, dtype, device, model, roles, base_state, dataset, stream)

    if use != "export":
        parts.text_encoder, parts.mm_encoder = build_contexts(weights, plan, device, student_only=use == "sample")
        # image <-> latent: the VAE (through the latent cache) for latent models on folders, else the family's own
        parts.codec = build_codec(weights, plan.arch, plan.family, plan.family.codec(cfg, plan.arch), dtype, device)
    return parts


def _weights_read_by(cfg: Config, use: Use) -> Config:
    """resolve_weights for the folders `dopsd sample|export` reads: Hub ids of the teacher (and, for export, of the
    text encoder, tokenizer and VAE) are left alone, so nothing else is downloaded. Data and context keys stay as
    written; only model.* paths come back."""
    context = dataclasses.replace(cfg.context, teacher_model=None)
    if use == "export":
        context = dataclasses.replace(context, kind="toy")
    data = cfg.data if use == "sample" else dataclasses.replace(cfg.data, kind="synthetic")
    resolved = resolve_weights(dataclasses.replace(cfg, context=context, data=data))
    return dataclasses.replace(cfg, model=resolved.model)


def _random_base(model: nn.Module, saved: Path | None) -> dict[str, Tensor] | None:
    """A random base: drawn now (train; returned, for base.safetensors), or the run's own read back from ``saved``."""
    if saved is None:
        return {k: v.clone() for k, v in model.state_dict().items()}
    base = ckpt.load_tensors(saved, dict(model.state_dict()))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(base[k])
    return None


def _init_lora_file(cfg: Config) -> Path | None:
    source = cfg.adapter.init_from
    try:
        return None if source is None else lora_file(source)
    except WeightsError as err:
        raise ConfigError(f"adapter.init_from: {err}") from None


def start_from_lora(roles: Roles, model: nn.Module, path: Path, main: bool = True) -> None:
    """adapter.init_from: the student's adapter, and the EMA teacher's (its fp32 master too), start from the LoRA
    at ``path`` (models/lora_load.py); a resumed run then loads its checkpoint over them."""
    try:
        loaded, path, fresh = read_lora(path, model)
    except WeightsError as err:
        raise ConfigError(f"adapter.init_from: {err}") from None
    with torch.no_grad():
        for k, v in loaded.items():
            roles.trainable[k].copy_(v)
    roles.trainable_changed()
    student = (p.detach() for p in roles.trainable.values())     # the EMA's order (LoRARoles asserts it)
    roles.ema.load_state_dict(dict(zip(roles.ema.names, student)))
    if main:
        print(f"adapter.init_from: student and teacher start from {path} ({len(loaded) // 2} LoRA modules"
              + (f"; {fresh} it leaves out start fresh)" if fresh else ")"))


def fill_caches(cfg: Config, progress: bool = True) -> dict:
    """Compute every cacheable encoder output of an image folder ahead of training (`dopsd cache`).

    Student features for every caption variant and for validation.prompts, sample.prompts (free text the grids
    read) and method.anchor_prompts (when the anchor is on), teacher features for every (image, variant) pair
    (D-OPSD) and VAE latents for every image (latent models); entries already cached are skipped, and an encoder
    with nothing to compute is never loaded. No transformer is built. A training run with data.encode_missing false
    then loads no encoder at all.
    """
    from ..models.adapter import model_family
    from ..progress import progress as progress_bar

    if cfg.data.kind not in IMAGE_KINDS:
        raise ConfigError(f"data.kind: `dopsd cache` precomputes the features of images (folder or webdataset), "
                          f"got {cfg.data.kind!r}")
    if cache_root(cfg) is None:
        raise ConfigError("data.cache_dir: is null (no cache); set a folder or \"auto\"")
    cfg = resolve_weights(cfg)              # Hub ids -> local snapshot folders
    check_buildable(cfg)
    arch = resolve_arch(cfg)
    family = model_family(arch)      # no plan: no transformer is built, not even on the meta device
    dtype, device = DTYPES[cfg.model.dtype], resolve_device(cfg.train.device)
    dataset = open_folder(cfg, progress)
    student = teacher = None
    if cfg.context.kind == "qwen3":
        student, teacher = build_qwen_contexts(cfg, arch, family, dtype, device, encode_missing=True)
        teacher = teacher if cfg.method.objective == "dopsd" else None
        for prompt in dict.fromkeys([*cfg.validation.prompts, *cfg.sample.prompts, *anchor_prompts(cfg)]):
            student([prompt])
    codec = build_codec(cfg, arch, family, None, dtype, device, encode_missing=True)
    for i in progress_bar(range(len(dataset)), desc="dopsd cache", unit="image", enabled=progress):
        pair = dataset[i]
        if student is not None:
            student(pair.captions)
            if teacher is not None:
                teacher(pair.captions, [pair.image] * len(pair.captions))
        if codec is not None:
            codec.encode(pair.image)
    stats = student.__self__.stats() if student is not None else {}
    loaded = student.__self__.loaded() if student is not None else []
    if codec is not None and codec.cache is not None:
        stats["vae_latents"] = {"hits": codec.cache.hits, "misses": codec.cache.misses}
        loaded += codec.loaded()
    return {"images": len(dataset), "cache_dir": str(cache_root(cfg)), **stats, "encoders_loaded": loaded,
            "data": dataset.summary()}
