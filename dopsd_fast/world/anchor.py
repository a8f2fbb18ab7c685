"""Optional anchors that keep ordinary prompts intact while the concept is learned (toy-world-notes 5.4).

Each iteration adds ``anchor_prompts`` ordinary captions to the objective, as one of two terms:
- ``self`` (on-policy, data-free): self-distillation (``Trainer.self_distil``, what a real run's
  ``method.anchor_per_iteration`` runs), the EMA teacher with the same text-only context on the student's own
  roll-out of each caption. It regresses the states the student itself reaches for "a red circle"
  onto what the teacher draws there, which is what undoes D-OPSD's colour bleed (README, "Continual tuning").
- ``replay`` (off-policy, needs data): flow matching on rendered ordinary pairs, SFT's loss on the world's data.
Default: ``self`` for D-OPSD, ``replay`` for SFT. Off unless asked (``dopsd demo --anchor 0``): the authors'
recipe has no anchor.
"""
from __future__ import annotations

import random

from ..method.step import StepOutput, sft_step
from ..train.trainer import SFTTrainer, Trainer
from .scene import caption, random_scene, random_spec, render


def self_distil_term(trainer: Trainer, n: int) -> None:
    """The trainer's own anchor (method.anchor_per_iteration) on fresh random captions of the world each iteration,
    rather than a fixed list."""
    rng = random.Random(trainer.cfg.train.seed * 7919 + trainer.step)
    trainer.self_distil([caption(random_scene(rng), random_spec(rng), rng) for _ in range(n)])


def replay_term(trainer: Trainer, n: int) -> None:
    rng = random.Random(trainer.cfg.train.seed * 7919 + trainer.step)
    scenes = [random_scene(rng) for _ in range(n)]
    feats = trainer._cast(trainer.text_encoder([caption(s, random_spec(rng), rng) for s in scenes]))
    x0 = [trainer.codec.encode(render(s)).to(trainer.dtype) for s in scenes]
    sft_step(trainer.roles, trainer.flow, feats, x0, trainer.cfg.method.sft_shift, trainer.noise)


ANCHORS = {"self": self_distil_term, "replay": replay_term}


class _Anchored:
    anchor_prompts, anchor = 0, "self"

    def forward_backward_step(self, batch) -> StepOutput:
        out = super().forward_backward_step(batch)
        if self.anchor_prompts:
            ANCHORS[self.anchor](self, self.anchor_prompts)
        return out


class AnchoredDOPSD(_Anchored, Trainer):
    pass


class AnchoredSFT(_Anchored, SFTTrainer):
    anchor = "replay"


def anchored_trainer(cfg, anchor_prompts: int, anchor: str | None = None, progress: bool = False) -> Trainer:
    """The objective's trainer with ``anchor_prompts`` captions per iteration in the ``anchor`` term (None: the
    objective's default)."""
    cls = AnchoredSFT if cfg.method.objective == "sft" else AnchoredDOPSD
    trainer = cls(cfg, progress=progress)
    trainer.anchor_prompts, trainer.anchor = anchor_prompts, anchor or cls.anchor
    return trainer
