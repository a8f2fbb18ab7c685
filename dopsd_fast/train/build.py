"""Config -> parts: the helpers ``assemble.py`` calls in order. ``resolve_plan`` checks everything that can be checked
without weights (used by --dry-run) and resolves the model family once."""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contexts.reference import ReferenceTeacherContext
from ..contexts.toy import ToyMultimodalEncoder, ToyTextEncoder
from ..data.buckets import BucketBatches
from ..data.latents import PixelLatents
from ..data.loader import BatchLoader, PairStream
from ..data.synthetic import SyntheticPairs
from ..method.roles import FullRoles, LoRARoles, Roles
from ..models.adapter import ModelFamily, model_family
from ..models.loading import WeightsError, read_config
from ..models.z_image import ZImageConfig
from ..nn.lora_linear import quantize_base
from .config import IMAGE_KINDS, Config, ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    arch: Any                   # the family's config: ZImageConfig or Flux2KleinConfig
    family: ModelFamily         # everything that differs between model families, resolved once from ``arch``
    total_params: int
    trainable_params: int
    lora_modules: int
    sigmas: list[float]         # roll-out sigma_0 .. sigma_K = 0 at data.image_size

    def describe(self, cfg: Config) -> dict[str, Any]:
        m = cfg.method
        return {
            "model": {"family": cfg.model.family, "weights": _weights_note(cfg),
                      "dtype": cfg.model.dtype, "base_precision": cfg.model.base_precision,
                      "arch": asdict(self.arch), "parameters": self.total_params},
            "adapter": {"mode": cfg.adapter.mode, "trainable_parameters": self.trainable_params,
                        **({"rank": cfg.adapter.rank, "alpha": cfg.adapter.alpha, "lora_modules": self.lora_modules}
                           if cfg.adapter.mode == "lora" else {})},
            "method": {"objective": m.objective, "loss": m.loss, "K": len(self.sigmas) - 1, "sigmas": self.sigmas,
                       "ema_decay": m.ema_decay, "per_step_backward": m.per_step_backward},
            "optim": asdict(cfg.optim),
            "train": asdict(cfg.train),
            "data": asdict(cfg.data),
            "context": asdict(cfg.context),
        }


def _check_arch_values(arch: dict[str, Any], config_cls: type = ZImageConfig) -> None:
    """Types from the config class's defaults; sizes must be positive."""
    for f in dataclasses.fields(config_cls):
        if f.name not in arch or f.default is None:
            continue
        v, default = arch[f.name], f.default
        if isinstance(default, tuple):
            ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)
            want = "a list of positive integers"
        elif isinstance(default, bool):
            ok, want = isinstance(v, bool), "true/false"
        elif isinstance(default, int):
            ok, want = isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"
        else:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"
        if not ok:
            raise ConfigError(f"model.arch.{f.name}: expected {want}, got {v!r}")


def _weights_note(cfg: Config) -> str:
    p = cfg.model.pretrained
    if p is None:
        return f"random init (seed {cfg.model.init_seed})"
    official = {"z_image": "Z-Image-Turbo", "flux2_klein": "FLUX.2 [klein] 4B (9B if the path says 9b)"}[cfg.model.family]
    return p if Path(p).exists() else f"{p} (not found yet: the official {official} config is assumed)"


def resolve_weights(cfg: Config, download: bool = True) -> Config:
    """``cfg`` with every Hugging Face id among its weight keys replaced by a local snapshot folder (models/hub.py).

    The one place ids are resolved: the trainer, `dopsd cache` and the dry run call it and build from the copy,
    while the run keeps (saves, compares on resume) the config as written. ``model.pretrained: owner/name[@rev]`` is
    the repo's ``transformer/`` folder, so ``text_encoder/``, ``tokenizer/``, ``vae/`` left null are its siblings in
    the same snapshot; ``model.text_encoder|tokenizer|vae: owner/name`` is that folder of another pipeline repo;
    ``context.teacher_model: owner/name`` is a transformers repo (its top-level files). Only the folders this run
    reads are downloaded. ``download=False`` (a dry run) reads the cache only and leaves an id it misses as it is.
    """
    from ..models.hub import parse_hub_id, snapshot

    m, c = cfg.model, cfg.context
    qwen, folder = c.kind == "qwen3", cfg.data.kind in IMAGE_KINDS
    used = {"text_encoder": qwen, "tokenizer": qwen, "vae": folder}      # vae: latent models on folders only
    model, context = {}, {}

    def fetch(key: str, spec: str, folders: list[str], required: list[str]) -> Path | None:
        try:
            return snapshot(spec, folders, required, download)
        except WeightsError as err:
            raise ConfigError(f"{key}: {err}") from None

    if m.pretrained is not None and parse_hub_id(m.pretrained):
        siblings = [k for k, use in used.items() if use and getattr(m, k) is None]
        required = ["transformer", *(k for k in siblings if k != "vae")]   # a pixel-space model reads no VAE
        root = fetch("model.pretrained", m.pretrained, ["transformer", *siblings], required)
        if root is not None:
            model["pretrained"] = str(root / "transformer")
    for key, use in used.items():
        spec = getattr(m, key)
        if use and spec is not None and parse_hub_id(spec):
            root = fetch(f"model.{key}", spec, [key], [key])
            if root is not None:
                model[key] = str(root / key)
    if qwen and cfg.method.objective == "dopsd" and c.teacher == "vlm" and c.teacher_model is not None \
            and parse_hub_id(c.teacher_model):
        root = fetch("context.teacher_model", c.teacher_model, [""], [])
        if root is not None:
            context["teacher_model"] = str(root)
    if not model and not context:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **model),
                               context=dataclasses.replace(c, **context))


def resolve_arch(cfg: Config, need_weights: bool = True) -> Any:
    if cfg.model.family == "flux2_klein":
        family = model_family(cfg.model.family)
        _check_arch_values(cfg.model.arch, family.config_cls)
        try:
            return family.resolve_arch(cfg, need_weights)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.model.pretrained is not None:
        return _pretrained_arch(cfg, need_weights)
    arch = dict(cfg.model.arch)
    if cfg.data.kind == "synthetic":
        arch.setdefault("in_channels", PixelLatents.channels)
    try:
        a = ZImageConfig.from_dict(arch)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.arch: {err}") from None
    _check_arch_values(arch)
    if a.dim % a.n_heads:
        raise ConfigError(f"model.arch.n_heads: must divide dim={a.dim}, got {a.n_heads}")
    if sum(a.axes_dims) != a.dim // a.n_heads:
        raise ConfigError(f"model.arch.axes_dims: must sum to dim/n_heads = {a.dim // a.n_heads}, got {list(a.axes_dims)}")
    if cfg.data.kind == "synthetic" and a.in_channels != PixelLatents.channels:
        raise ConfigError(f"model.arch.in_channels: the synthetic data set is pixel-space RGB, so it must be 3, got {a.in_channels}")
    patch = a.all_patch_size[0]
    if cfg.data.image_size % patch:
        raise ConfigError(f"data.image_size: must be a multiple of the patch size {patch}")
    return a


def _pretrained_arch(cfg: Config, need_weights: bool) -> ZImageConfig:
    """The folder's config.json defines the architecture (read without touching the weights).

    Without ``need_weights`` (a dry run planning ahead of the download) a missing folder means the official config.
    """
    if cfg.model.arch:
        raise ConfigError("model.arch: must be empty when model.pretrained is set (the folder's config.json defines it)")
    folder = Path(cfg.model.pretrained)
    if not need_weights and not folder.exists():
        return ZImageConfig()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {folder / 'config.json'} not found; point it at the transformer/ folder "
                          "of a diffusers Z-Image checkpoint")
    try:
        a = read_config(folder)
    except WeightsError as err:
        raise ConfigError(f"model.pretrained: {err}") from None
    if cfg.data.kind == "synthetic" and a.in_channels != PixelLatents.channels:
        raise ConfigError(f"model.pretrained: a {a.in_channels}-channel latent model cannot train on the pixel-space "
                          "synthetic data set; use data.kind=folder")
    return a


def build_model(arch: Any, device: str | torch.device = "cpu") -> nn.Module:
    return model_family(arch).build(arch, device)


def build_roles(cfg: Config, model: nn.Module, copy_model=copy.deepcopy) -> Roles:
    """``copy_model(model)``: how full fine-tuning copies the student into its teacher."""
    a = cfg.adapter
    if a.mode == "lora":
        return LoRARoles(model, a.targets, a.rank, a.alpha)
    # DeepSpeed's bf16 optimizer keeps its own fp32 masters
    return FullRoles(model, fp32_masters=cfg.deepspeed.stage is None, copy_model=copy_model)


def quantize_frozen_base(cfg: Config, model: nn.Module) -> None:
    """model.base_precision=fp8: the LoRA linears' frozen base weights -> e4m3 + row scales, after build_roles (and
    after any load of base weights into them: the quantised base is never loaded or saved itself)."""
    if cfg.model.base_precision == "fp8":
        quantize_base(model, cfg.model.fp8_input_grad)


def resolve_plan(cfg: Config, need_weights: bool = True) -> Plan:
    """Everything checkable without weights: architecture, adapter targets, parameter counts (meta device)."""
    arch = resolve_arch(cfg, need_weights)
    family = model_family(arch)
    model = family.build(arch, "meta")
    total = sum(p.numel() for p in model.parameters())
    try:
        roles = build_roles(cfg, model)
    except ValueError as err:
        raise ConfigError(f"adapter.targets: {err}") from None
    lora_modules = len(getattr(roles, "targets", []))
    sigmas = family.training_sigmas(cfg.method, cfg.sample, family.latent_shape(cfg, arch))
    return Plan(arch, family, total, sum(p.numel() for p in roles.trainable.values()), lora_modules, sigmas)


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> a torch device; asking for CUDA where there is none is a config error, not a crash later."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r}, but torch sees no CUDA device (torch {torch.__version__}); "
                          "use auto or cpu, or install a CUDA build of torch")
    return device


def check_buildable(cfg: Config) -> None:
    """Refuse, before any model is built, the parts this version cannot assemble yet."""
    if (cfg.data.kind == "world") != (cfg.context.kind == "world"):
        raise ConfigError("data.kind and context.kind: the miniature world needs both set to world (see configs/world-demo.yaml)")
    if cfg.data.kind == "world":
        if cfg.model.pretrained is None:
            raise ConfigError("model.pretrained: the world fine-tunes a shipped turbo; set it to the folder "
                              "dopsd_fast/world/assets/turbo, as `dopsd demo` does")
        from ..world.scene import CONCEPTS
        if cfg.data.path is not None and cfg.data.path not in CONCEPTS:
            raise ConfigError(f"data.path: {cfg.data.path!r} names no concept of the world; one of {', '.join(CONCEPTS)}")
        return
    from .build_qwen import check_real_parts
    check_real_parts(cfg, resolve_arch(cfg, need_weights=False))


def build_data(cfg: Config, rank: int = 0, world: int = 1, progress: bool = False) -> tuple[object, BatchLoader]:
    """The data set and rank ``rank``'s batches of it: the stream plans global batches of train.batch_size x
    ``world``, the loader decodes this rank's rows in data.num_workers processes."""
    d = cfg.data
    if d.kind == "world":
        from ..world.data import ConceptPairs
        dataset, stream_cls = ConceptPairs(d.seed, d.path), PairStream
    elif d.kind in IMAGE_KINDS:
        from .build_qwen import open_folder
        dataset, stream_cls = open_folder(cfg, progress), BucketBatches
    else:
        dataset, stream_cls = SyntheticPairs(d.num_pairs, d.image_size, d.seed), PairStream
    stream = stream_cls(dataset, cfg.train.batch_size * world, cfg.train.seed)
    cuda = resolve_device(cfg.train.device).type == "cuda"
    return dataset, BatchLoader(stream, rank, world, data_workers(d.num_workers, cuda, world), pin_memory=cuda)


def data_workers(setting: int | str, cuda: bool, world: int) -> int:
    """data.num_workers: a number as given; auto = none on the CPU, where a worker would take a core from the
    training's own threads (and tests start no processes); on CUDA min(4, this rank's share of the cores less
    the one its training process runs on), at least 1: a few images per rank and step decode in well under a GPU
    step, so 4 processes x 2 batches ahead hide the decoding, and more only hold memory."""
    if setting != "auto":
        return int(setting)
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world)) - 1))


def build_contexts(cfg: Config, plan: Plan, device: torch.device = torch.device("cpu"), student_only: bool = False):
    """(c_s, c_t) callables; ``student_only`` (`dopsd sample`): (c_s, None), and no teacher encoder is built."""
    arch, family = plan.arch, plan.family
    if cfg.context.kind == "world":
        from ..world.bundle import load_encoders
        from ..world.encoders import MultimodalContext, TextContext
        encoders = load_encoders()
        return TextContext(encoders), None if student_only else MultimodalContext(encoders)
    if cfg.context.kind == "qwen3":
        from .build_qwen import build_qwen_contexts
        return build_qwen_contexts(cfg, arch, family, DTYPES[cfg.model.dtype], device, student_only=student_only)
    text = ToyTextEncoder(family.text_dim(arch), cfg.context.max_text_tokens)
    if student_only:
        return text, None
    if cfg.context.teacher == "reference":
        return text, ReferenceTeacherContext(text, family.codec(cfg, arch), cfg.context.reference_prompt)
    return text, ToyMultimodalEncoder(text, cfg.data.image_size, image_first=cfg.context.teacher_order == "image_first")
