"""Config -> the real-data parts: image folders, Qwen3 / Qwen3-VL contexts through the caches, the VAE codec.

Kept apart from ``build.py`` (which calls these) so the toy/synthetic default imports neither transformers nor
diffusers; nothing here imports ``build.py`` back. The model family comes in resolved (``Plan.family``). Paths are
checked here, before any weights are read, so a wrong folder is a ConfigError.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data.feature_cache import default_cache_root
from ..data.folder import ImageFolder
from .config import IMAGE_KINDS, Config, ConfigError, anchor_prompts



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
    return cfg.data.kind in IMAGE_KINDS and getattr(arch, "in_channels", 3) != 3


def check_real_parts(cfg: Config, arch) -> None:
    """The qwen3 context and folder data: every folder they need exists (weights are read later)."""
    if cfg.data.kind in IMAGE_KINDS and cfg.context.kind == "toy" and cfg.data.buckets != 1:
        raise ConfigError("data.buckets: the toy context encodes square images only; set data.buckets=1, "
                          "or context.kind=qwen3")
    if cfg.context.kind == "qwen3":
        _need_dir(component_dir(cfg, "text_encoder"), "model.text_encoder", "Qwen3 text encoder")
        _need_dir(component_dir(cfg, "tokenizer"), "model.tokenizer", "tokenizer")
        if cfg.method.objective == "dopsd" and cfg.context.teacher == "vlm":
            if cfg.context.teacher_model is None:
                raise ConfigError("context.teacher_model: D-OPSD's teacher needs a Qwen3-VL folder or Hugging Face "
                                  "id (e.g. Qwen/Qwen3-VL-4B-Instruct)")
            _need_dir(Path(cfg.context.teacher_model), "context.teacher_model", "Qwen3-VL")
    if uses_vae(cfg, arch):
        _need_dir(component_dir(cfg, "vae"), "model.vae", "VAE")


def index_dir(cfg: Config) -> Path:
    """Where data folders' indexes are kept: the data cache's index/ (shared by runs), else the run's data_index/."""
    root = cache_root(cfg)
    return root / "index" if root is not None else Path(cfg.train.output_dir) / "data_index"


def open_folder(cfg: Config, progress: bool = False) -> ImageFolder:
    """data.path as an ImageFolder (TarShards for webdataset), scanned or read from its index on rank 0 only; the
    other ranks receive the index from it (so nodes need not share the index folder) and never list or decode the
    folder themselves."""
    from ..data.shards import TarShards
    from .distributed import from_rank0

    d, cls = cfg.data, TarShards if cfg.data.kind == "webdataset" else ImageFolder
    index = from_rank0(lambda: cls(d.path, d.image_size, d.buckets, index_dir=index_dir(cfg), progress=progress).index,
                       "the data folder's index")
    return cls(d.path, d.image_size, d.buckets, index=index)


def text_spec(cfg: Config):
    from ..contexts.qwen_text import KLEIN_TEXT, Z_IMAGE_TEXT
    return dataclasses.replace(KLEIN_TEXT if cfg.model.family == "flux2_klein" else Z_IMAGE_TEXT,
                               max_tokens=cfg.context.max_text_tokens)


def _encode_missing(cfg: Config, override: bool | None) -> bool:
    return cfg.data.encode_missing if override is None else override


def build_qwen_contexts(cfg: Config, arch, family, dtype, device: str | torch.device = "cpu",
                        encode_missing: bool | None = None, student_only: bool = False):
    """(student, teacher) callables with the toy encoders' signatures, backed by the feature caches.

    With a cache (data.cache_dir) the encoders are loaded onto ``device`` at their first miss, so a run on a warm
    cache never loads them; ``encode_missing`` (default data.encode_missing) false makes a miss a CacheMiss (exit
    2) instead. Without a cache both are loaded here, as every batch runs them. ``student_only``: (student, None),
    and no teacher is built.
    """
    from ..contexts.cached import CachedContexts, Lazy
    from ..contexts.qwen_text import QwenTextEncoder, folder_feature_dim
    from ..contexts.qwen_text import folder_identity as text_identity
    from ..contexts.reference import ReferenceTeacherContext
    from ..contexts.teacher_vlm import QwenVLTeacher
    from ..contexts.teacher_vlm import folder_identity as teacher_identity

    c, root, encode_missing = cfg.context, cache_root(cfg), _encode_missing(cfg, encode_missing)
    spec = text_spec(cfg)
    te_dir, tok_dir = component_dir(cfg, "text_encoder"), component_dir(cfg, "tokenizer")
    got, want = folder_feature_dim(te_dir, spec), family.text_dim(arch)
    if got != want:
        raise ConfigError(f"model.text_encoder: its features have {got} dims, the transformer takes "
                          f"{want}; the folders do not belong together")
    text = Lazy(lambda: QwenTextEncoder.from_pretrained(te_dir, tok_dir, spec, dtype, device),
                text_identity(te_dir, spec, dtype), "model.text_encoder")
    if root is None:
        text.get()
    if student_only:
        return CachedContexts(text, None, root, encode_missing).student, None
    if cfg.method.objective == "dopsd" and c.teacher == "reference":
        # teacher text = the cached features of "<prompt> <reference_prompt>"; the target as reference latents
        ctx = CachedContexts(text, None, root, encode_missing)
        codec = build_codec(cfg, arch, family, None, dtype, device, encode_missing)
        return ctx.student, ReferenceTeacherContext(ctx.student, codec, c.reference_prompt)
    teacher = None
    if cfg.method.objective == "dopsd":
        # the teacher reads the student's layers (klein: 9, 18, 27 concatenated), real tokens only
        teacher = Lazy(lambda: QwenVLTeacher.from_pretrained(
                           c.teacher_model, text.get(), c.teacher_order, c.teacher_max_tokens, c.teacher_min_pixels,
                           c.teacher_max_pixels, dtype, device, spec, c.teacher_prompt),
                       teacher_identity(c.teacher_model, text.identity, spec, c.teacher_order, c.teacher_max_tokens,
                                        c.teacher_min_pixels, c.teacher_max_pixels, dtype, c.teacher_prompt),
                       "context.teacher_model")
        if root is None:
            teacher.get()
    ctx = CachedContexts(text, teacher, root, encode_missing)
    return ctx.student, ctx.teacher


def _vae_identity(folder: Path, dtype) -> str:
    from ..data.feature_cache import folder_fingerprint
    return f"vae-{folder_fingerprint(folder)[:16]}-{dtype}"


def build_codec(cfg: Config, arch, family, fallback, dtype, device: str | torch.device = "cpu",
                encode_missing: bool | None = None):
    """The VAE codec (through the latent cache) for latent models on folder data; else ``fallback``.

    With a cache the VAE is loaded onto ``device`` at the first latent that misses; latent shapes come from its
    config.json. With data.encode_missing false a miss is a CacheMiss and sample grids decode on a second VAE
    loaded on the CPU at the first grid, so train.device only ever holds the transformer.
    """
    if not uses_vae(cfg, arch):
        return fallback
    import functools

    from ..contexts.cached import CachedLatents, Lazy
    from ..data.feature_cache import FeatureCache
    from ..models.loading import read_component_config

    folder, root = component_dir(cfg, "vae"), cache_root(cfg)
    encode_missing = _encode_missing(cfg, encode_missing)
    identity = _vae_identity(folder, dtype)

    def vae(on):
        return Lazy(lambda: family.vae_codec(folder, dtype, on), identity, "model.vae")

    if root is None:
        return CachedLatents(vae(device).get(), None)
    shape = functools.partial(family.vae_latent_shape, read_component_config(folder, "vae/"))
    channels = shape(0, 0)[0]
    return CachedLatents(vae(device), FeatureCache(root, "vae_latents", identity), shape, channels,
                         None if encode_missing else vae("cpu"), encode_missing)


def check_cached(cfg: Config, arch, family, dtype, dataset) -> None:
    """A run with a cache and data.encode_missing false loads no encoder: every encoder output it reads (each
    caption variant's student features, each (variant, image) teacher's, the latents it encodes, validation.prompts'
    and the anchor's method.anchor_prompts' features) must be in the cache. Checked at start-up, before any model is
    built (file lookups plus one decode and crop of every image, for its key); the first missing entry is a CacheMiss
    (exit 2) naming its file."""
    if cfg.data.kind not in IMAGE_KINDS or cache_root(cfg) is None or cfg.data.encode_missing:
        return
    qwen = cfg.context.kind == "qwen3"
    dopsd = cfg.method.objective == "dopsd"
    if not qwen and not uses_vae(cfg, arch):
        return
    from ..contexts.cached import missing_entry
    from ..data.feature_cache import image_key, pair_key, text_key

    c = cfg.context
    student, teacher = build_qwen_contexts(cfg, arch, family, dtype, encode_missing=False) if qwen else (None, None)
    ctx = student.__self__ if student is not None else None
    reference = qwen and dopsd and c.teacher == "reference"
    codec = None
    if uses_vae(cfg, arch) and (reference or not dopsd):    # latents it encodes: SFT targets, reference tokens
        codec = teacher.codec if reference else build_codec(cfg, arch, family, None, dtype, encode_missing=False)
    vlm = ctx is not None and ctx.teacher_cache is not None

    def need(cache, key: str, what: str) -> None:
        if key not in cache:
            raise missing_entry(cache, key, what)

    if ctx is not None and cfg.validation.every:
        for prompt in cfg.validation.prompts:
            need(ctx.text_cache, text_key(prompt), f"student text features of validation prompt {prompt!r}")
    if ctx is not None:
        for prompt in anchor_prompts(cfg):
            need(ctx.text_cache, text_key(prompt), f"student text features of anchor prompt {prompt!r}")
    for i, record in enumerate(dataset.records):         # an ImageFolder: captions known, images read if keyed
        name = record.path.name
        image = dataset[i].image if vlm or codec is not None else None
        for prompt in record.captions:
            if ctx is not None:
                need(ctx.text_cache, text_key(prompt), f"student text features of {name}'s caption {prompt!r}")
            if reference:
                need(ctx.text_cache, text_key(teacher.teacher_prompt(prompt)),
                     f"the reference teacher's text features of {name}'s caption {prompt!r}")
            if vlm:
                need(ctx.teacher_cache, pair_key(prompt, image), f"teacher features of {name} with {prompt!r}")
        if codec is not None:
            need(codec.cache, image_key(image), f"VAE latents of {name}")
