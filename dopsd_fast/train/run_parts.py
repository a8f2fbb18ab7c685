"""A finished run's parts for `dopsd sample` and `dopsd export`: only what the command reads, never a Trainer.

``load_run`` rebuilds the transformer, its roles and adapters from ``<run_dir>/config.yaml``, the run's base weights
and a checkpoint's student. Export needs nothing more; sample adds the student's text context (cache or encoder) and
the image codec (the VAE, loaded at its first decode, for latent models on folders). Neither builds the data stream
or the teacher's contexts, so the data folder, the VLM teacher and (for export) the encoders may be gone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..method.roles import Roles
from ..models.adapter import model_family
from ..models.compile import compile_blocks
from ..sample import decoded_samples
from . import checkpoint as ckpt
from .build import DTYPES, Plan, build_contexts, build_model, build_roles, resolve_device, resolve_plan, resolve_weights
from .build_qwen import build_codec
from .config import Config, load_config


@dataclass
class RunParts:
    cfg: Config                 # the run's config as written (adapter.init_from=null, data.encode_missing=true)
    plan: Plan
    model: nn.Module            # the transformer with the adapters injected (LoRA) or the student itself (full)
    roles: Roles                # trainable = the checkpoint's student
    loaded_from: Path           # the checkpoint directory
    device: torch.device
    dtype: torch.dtype
    text_encoder: Callable[[list[str]], list[Tensor]] | None = None     # c_s; sample only
    codec: Any = None                                                   # latents <-> images; sample only

    @property
    def family(self):
        return model_family(self.plan.arch)

    def sampler_sigmas(self, steps: int) -> list[float]:
        """As Trainer.sampler_sigmas: the model's own few-step sampler at data.image_size."""
        return self.family.sampling_sigmas(steps, self.cfg.sample.shift, self.family.latent_shape(self.cfg, self.plan.arch))

    def sample_student(self, prompts: list[str], sigmas: list[float], seed: int | None = None) -> list[Tensor]:
        """(3, S, S) images in [-1, 1], one per prompt, as Trainer.sample_student (same noise, same decode)."""
        feats = [f.to(self.device, self.dtype) for f in self.text_encoder(prompts)]
        return decoded_samples(self.roles.use("student"), self.family.flow, feats, self.codec, self.cfg.data.image_size,
                               sigmas, self.cfg.sample.seed if seed is None else seed, self.dtype,
                               self.cfg.model.ops_backend)

    def data_prompts(self, n: int = 4) -> list[str]:
        """The captions a training grid shows (Trainer.grid_pairs): the first ``n`` pairs' second caption variant.
        Reads the data set (an image folder must still exist), never its batch stream."""
        d = self.cfg.data
        if d.kind == "folder":
            from ..data.folder import DataError, ImageFolder
            try:
                dataset = ImageFolder(d.path, d.image_size, d.buckets)
            except DataError as err:
                raise DataError(f"{err}; its captions are the default prompts: pass --prompt or set sample.prompts") from None
        elif d.kind == "world":
            from ..world.data import ConceptPairs
            dataset = ConceptPairs(d.seed)
        else:
            from ..data.synthetic import SyntheticPairs
            dataset = SyntheticPairs(d.num_pairs, d.image_size, d.seed)
        pairs = [dataset[i] for i in range(min(n, len(dataset)))]
        return [p.captions[min(1, len(p.captions) - 1)] for p in pairs]


def load_run(run_dir: Path, checkpoint: str | None = None, sampling: bool = False) -> RunParts:
    """The parts of the run in ``run_dir`` at ``checkpoint`` (a step-XXXXXX path or name; default the newest).

    ``sampling=False`` (export): the transformer and its adapters only. ``sampling=True``: also the student's text
    context and the codec. The checkpoint is found before any weights load.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ckpt.CheckpointError(f"{cfg_path}: missing; pass the output_dir of a `dopsd train` run")
    # adapter.init_from=null: the checkpoint's student replaces the initial LoRA, which need not be there any more;
    # data.encode_missing=true: new prompts load the text encoder (and the VAE decodes on train.device)
    cfg = load_config(str(cfg_path), ["train.resume=null", f"train.output_dir={json.dumps(str(run_dir))}",
                                      "adapter.init_from=null", "data.encode_missing=true"])
    root = run_dir / "checkpoints"
    found = ckpt.list_checkpoints(root)
    if checkpoint is None and not found:
        raise ckpt.CheckpointError(f"{root}: no complete checkpoint; train first or pass --checkpoint")
    path = ckpt.find_checkpoint(root, checkpoint) if checkpoint else found[-1]

    parts = _resolve_weights(cfg, sampling)
    plan = resolve_plan(parts)
    dtype, device = DTYPES[cfg.model.dtype], resolve_device(cfg.train.device)
    torch.manual_seed(cfg.model.init_seed)      # as the Trainer: random base, then the LoRA init (both replaced below)
    if cfg.model.pretrained is None:
        model = build_model(plan.arch).to(dtype)
    else:
        model = model_family(plan.arch).load(parts.model.pretrained, dtype)
    model.to(device)
    base = dict(model.state_dict()) if cfg.model.pretrained is None else None     # keys before LoRA injection
    roles = build_roles(cfg, model)
    if base is not None:        # a randomly initialised base was saved by the run (Trainer._write_run_files)
        base_sd = ckpt.load_tensors(run_dir / "base.safetensors", base)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in base_sd:
                    v.copy_(base_sd[k])
    student = ckpt.load_tensors(path / "student.safetensors", dict(roles.trainable))
    with torch.no_grad():
        for k, p in roles.trainable.items():
            p.copy_(student[k])
    roles.trainable_changed()
    run = RunParts(cfg, plan, model, roles, path, device, dtype)
    if sampling:
        for m in dict.fromkeys((roles.student_model, roles.teacher_model)):
            compile_blocks(m, cfg.model.compile)
        run.text_encoder, _ = build_contexts(parts, plan.arch, device, student_only=True)
        run.codec = build_codec(parts, plan.arch, run.family.codec(cfg, plan.arch), dtype, device)
    return run


def _resolve_weights(cfg: Config, sampling: bool) -> Config:
    """resolve_weights for the folders this command reads: Hub ids of the teacher (and, for export, of the text
    encoder, tokenizer and VAE) are left alone, so nothing else is downloaded. Data and context keys stay as
    written; only model.* paths come back."""
    context = dataclasses.replace(cfg.context, teacher_model=None)
    if not sampling:
        context = dataclasses.replace(context, kind="toy")
    data = cfg.data if sampling else dataclasses.replace(cfg.data, kind="synthetic")
    resolved = resolve_weights(dataclasses.replace(cfg, context=context, data=data))
    return dataclasses.replace(cfg, model=resolved.model)
