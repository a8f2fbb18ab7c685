"""Config -> the real-data parts: image folders, Qwen3 / Qwen3-VL contexts through the caches, the VAE codec.

Kept apart from ``build.py`` (which calls these) so the toy/synthetic default imports neither transformers nor
diffusers. Paths are checked here, before any weights are read, so a wrong folder is a ConfigError.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data.buckets import BucketBatches
from ..data.feature_cache import default_cache_root
from ..data.folder import ImageFolder
from .config import Config, ConfigError



def component_dir(cfg: Config, name: str) -> Path:
    """model.<name> if set, else the sibling folder of model.pretrained (a diffusers download's layout)."""
    explicit = getattr(cfg.model, name)
    if explicit is not None:
        return Path(explicit)
    if cfg.model.pretrained is None:
        raise ConfigError(f"model.{name}: set it (or model.pretrained, whose sibling {name}/ is used)")
    return Path(cfg.model.pretrained).parent / name


def cache_root(cfg: Config) -> Path | None:
    d = cfg.data.cache_dir
    return None if d is None else default_cache_root() if d == "auto" else Path(d)


def _need_dir(path: Path, key: str, what: str) -> None:
    if not (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{key}: {path} is not a {what} folder (no config.json / tokenizer.json); "
                          "download the weights there or set the key to where they are")


def uses_vae(cfg: Config, arch) -> bool:
    """Latent-space model on image-folder data: Z-Image's 16-channel VAE latents."""
    return cfg.data.kind == "folder" and getattr(arch, "in_channels", 3) != 3


def check_real_parts(cfg: Config, arch) -> None:
    """The qwen3 context and folder data: every folder they need exists (weights are read later)."""
    if cfg.data.kind == "folder" and cfg.context.kind == "toy" and cfg.data.buckets != 1:
        raise ConfigError("data.buckets: the toy context encodes square images only; set data.buckets=1, "
                          "or context.kind=qwen3")
    if cfg.context.kind == "qwen3":
        _need_dir(component_dir(cfg, "text_encoder"), "model.text_encoder", "Qwen3 text encoder")
        _need_dir(component_dir(cfg, "tokenizer"), "model.tokenizer", "tokenizer")
        if cfg.method.objective == "dopsd" and cfg.context.teacher == "vlm":
            if cfg.context.teacher_model is None:
                raise ConfigError("context.teacher_model: D-OPSD's teacher needs a local Qwen3-VL folder "
                                  "(e.g. Qwen3-VL-4B-Instruct)")
            _need_dir(Path(cfg.context.teacher_model), "context.teacher_model", "Qwen3-VL")
    if uses_vae(cfg, arch):
        _need_dir(component_dir(cfg, "vae"), "model.vae", "VAE")


def build_folder_data(cfg: Config):
    d = cfg.data
    dataset = ImageFolder(d.path, d.image_size, d.buckets)
    return dataset, BucketBatches(dataset, cfg.train.batch_size, cfg.train.seed)


def build_qwen_contexts(cfg: Config, arch, dtype, device: str | torch.device = "cpu"):
    """(student, teacher) callables with the toy encoders' signatures, backed by the feature caches."""
    from ..contexts.cached import CachedContexts
    from ..contexts.qwen_text import KLEIN_TEXT, Z_IMAGE_TEXT, QwenTextEncoder
    from ..contexts.reference import ReferenceTeacherContext
    from ..contexts.teacher_vlm import QwenVLTeacher
    from ..models.adapter import model_family

    c = cfg.context
    spec = dataclasses.replace(KLEIN_TEXT if cfg.model.family == "flux2_klein" else Z_IMAGE_TEXT,
                               max_tokens=c.max_text_tokens)
    text = QwenTextEncoder.from_pretrained(component_dir(cfg, "text_encoder"), component_dir(cfg, "tokenizer"),
                                           spec, dtype, device)
    want = model_family(arch).text_dim(arch)
    if text.feat_dim != want:
        raise ConfigError(f"model.text_encoder: its features have {text.feat_dim} dims, the transformer takes "
                          f"{want}; the folders do not belong together")
    if cfg.method.objective == "dopsd" and c.teacher == "reference":
        # teacher text = the cached features of "<prompt> <reference_prompt>"; the target as reference latents
        ctx = CachedContexts(text, None, cache_root(cfg))
        return ctx.student, ReferenceTeacherContext(ctx.student, build_codec(cfg, arch, None, dtype, device), c.reference_prompt)
    teacher = None
    if cfg.method.objective == "dopsd":
        # the teacher reads the student's layers (klein: 9, 18, 27 concatenated), real tokens only
        teacher = QwenVLTeacher.from_pretrained(c.teacher_model, text, c.teacher_order, c.teacher_max_tokens,
                                                c.teacher_min_pixels, c.teacher_max_pixels, dtype, device, spec,
                                                c.teacher_prompt)
    ctx = CachedContexts(text, teacher, cache_root(cfg))
    return ctx.student, ctx.teacher


def build_codec(cfg: Config, arch, fallback, dtype, device: str | torch.device = "cpu"):
    """The VAE codec (through the latent cache) for latent models on folder data; else ``fallback``."""
    if not uses_vae(cfg, arch):
        return fallback
    from ..contexts.cached import CachedLatents
    from ..data.feature_cache import FeatureCache, folder_fingerprint
    from ..models.adapter import model_family

    folder = component_dir(cfg, "vae")
    root = cache_root(cfg)
    cache = FeatureCache(root, "vae_latents", f"vae-{folder_fingerprint(folder)[:16]}-{dtype}") if root else None
    return CachedLatents(model_family(arch).vae_codec(folder, dtype, device), cache)


def fill_caches(cfg: Config, progress: bool = True) -> dict:
    """Compute every cacheable encoder output of an image folder ahead of training (`dopsd cache`).

    Student features for every caption variant, teacher features for every (image, variant) pair (D-OPSD) and VAE
    latents for every image (latent models); entries already cached are skipped. No transformer is built.
    """
    from tqdm import tqdm

    from .build import DTYPES, check_buildable, resolve_arch, resolve_device

    if cfg.data.kind != "folder":
        raise ConfigError(f"data.kind: `dopsd cache` precomputes image-folder features, got {cfg.data.kind!r}")
    if cache_root(cfg) is None:
        raise ConfigError("data.cache_dir: is null (no cache); set a folder or \"auto\"")
    check_buildable(cfg)
    arch = resolve_arch(cfg)
    dtype, device = DTYPES[cfg.model.dtype], resolve_device(cfg.train.device)
    dataset, _ = build_folder_data(cfg)
    student = teacher = None
    if cfg.context.kind == "qwen3":
        student, teacher = build_qwen_contexts(cfg, arch, dtype, device)
        teacher = teacher if cfg.method.objective == "dopsd" else None
    codec = build_codec(cfg, arch, None, dtype, device)
    for i in tqdm(range(len(dataset)), desc="dopsd cache", unit="image", disable=not progress):
        pair = dataset[i]
        if student is not None:
            student(pair.captions)
            if teacher is not None:
                teacher(pair.captions, [pair.image] * len(pair.captions))
        if codec is not None:
            codec.encode(pair.image)
    stats = student.__self__.stats() if student is not None else {}
    if codec is not None and codec.cache is not None:
        stats["vae_latents"] = {"hits": codec.cache.hits, "misses": codec.cache.misses}
    return {"images": len(dataset), "cache_dir": str(cache_root(cfg)), **stats, "data": dataset.summary()}
