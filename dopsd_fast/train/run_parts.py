"""A finished run's parts for `dopsd sample` and `dopsd export`: only what the command reads, never a Trainer.

``load_run`` assembles the run of ``<run_dir>/config.yaml`` as the trainer does (``assemble.py``, ``use`` sample or
export) on the run's base weights, then loads a checkpoint's student. Export needs the transformer and its adapters
only; sample adds the student's text context (cache or encoder) and the image codec (the VAE, loaded at its first
decode, for latent models on folders). Neither builds the data stream or the teacher's contexts, so the data folder,
the VLM teacher and (for export) the encoders may be gone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..sample import decoded_samples
from . import checkpoint as ckpt
from .assemble import Parts, assemble
from .config import IMAGE_KINDS, load_config


@dataclass
class RunParts(Parts):
    """A finished run's parts: cfg as written with adapter.init_from=null and data.encode_missing=true; roles'
    trainable = the checkpoint's student."""
    loaded_from: Path | None = None     # the checkpoint directory

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
        if d.kind in IMAGE_KINDS:
            from ..data.folder import DataError
            from .build_qwen import open_folder
            try:
                dataset = open_folder(self.cfg)         # the run's index: no scan of an unchanged folder
            except DataError as err:
                raise DataError(f"{err}; its captions are the default prompts: pass --prompt or set sample.prompts") from None
        elif d.kind == "world":
            from ..world.data import ConceptPairs
            dataset = ConceptPairs(d.seed, d.path)
        else:
            from ..data.synthetic import SyntheticPairs
            dataset = SyntheticPairs(d.num_pairs, d.image_size, d.seed)
        captions = [dataset.captions(i) for i in range(min(n, len(dataset)))]
        return [c[min(1, len(c) - 1)] for c in captions]


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

    parts = assemble(cfg, "sample" if sampling else "export", base=run_dir / "base.safetensors")
    student = ckpt.load_tensors(path / "student.safetensors", dict(parts.roles.trainable))
    with torch.no_grad():
        for k, p in parts.roles.trainable.items():
            p.copy_(student[k])
    parts.roles.trainable_changed()
    return RunParts(**vars(parts), loaded_from=path)
