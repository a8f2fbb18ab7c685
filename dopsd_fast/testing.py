"""Builders for tests and benchmarks: the tiny preset in a temporary directory, seeded adapter weights."""
from __future__ import annotations

import torch

from dopsd_fast.train.config import load_config
from dopsd_fast.train.trainer import make_trainer


def tiny_trainer(tmp_path, *overrides: str):
    cfg = load_config("tiny-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", *overrides])
    return make_trainer(cfg, progress=False)


@torch.no_grad()
def randomize_adapters(trainer, seed: int = 0, scale: float = 0.05) -> None:
    """Give student and teacher different non-zero weights (at init B = 0, so dL/dA would be 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in list(trainer.roles.trainable.values()) + trainer.roles.ema.teacher:
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    trainer.roles.trainable_changed()
    trainer.roles.ema.load_state_dict({k: t.clone() for k, t in zip(trainer.roles.ema.names, trainer.roles.ema.teacher)})
