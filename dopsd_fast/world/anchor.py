"""Optional anchors that keep ordinary prompts intact while the concept is learned (toy-world-notes 5.4).

Each iteration adds ``anchor_prompts`` ordinary captions to the objective: for D-OPSD a data-free
self-distillation term (teacher = the EMA with the same text-only context, on the student's roll-out), for SFT
a replay term (flow matching on rendered ordinary pairs). Off by default (``dopsd demo --anchor 0``): the
authors' recipe has no anchor.
"""
from __future__ import annotations

import random

from ..method.step import StepOutput, dopsd_step, sft_step
from ..train.trainer import SFTTrainer, Trainer
from .scene import caption, random_scene, random_spec, render


class AnchoredDOPSD(Trainer):
    anchor_prompts = 0

    def forward_backward_step(self, batch) -> StepOutput:
        out = super().forward_backward_step(batch)
        if self.anchor_prompts:
            rng = random.Random(self.cfg.train.seed * 7919 + self.step)
            prompts = [caption(random_scene(rng), random_spec(rng), rng) for _ in range(self.anchor_prompts)]
            feats = self._cast(self.text_encoder(prompts))
            shape = self.codec.latent_shape(self.cfg.data.image_size, self.cfg.data.image_size)
            dopsd_step(self.roles, self.flow, feats, feats, [shape] * len(prompts), self.sigmas,
                       self.cfg.method.loss, True, self.noise, self.dtype)
        return out


class AnchoredSFT(SFTTrainer):
    anchor_prompts = 0

    def forward_backward_step(self, batch) -> StepOutput:
        out = super().forward_backward_step(batch)
        if self.anchor_prompts:
            rng = random.Random(self.cfg.train.seed * 7919 + self.step)
            scenes = [random_scene(rng) for _ in range(self.anchor_prompts)]
            feats = self._cast(self.text_encoder([caption(s, random_spec(rng), rng) for s in scenes]))
            x0 = [self.codec.encode(render(s)).to(self.dtype) for s in scenes]
            sft_step(self.roles, self.flow, feats, x0, self.cfg.method.sft_shift, self.noise)
        return out


def anchored_trainer(cfg, anchor_prompts: int) -> Trainer:
    cls = AnchoredSFT if cfg.method.objective == "sft" else AnchoredDOPSD
    trainer = cls(cfg, progress=False)
    trainer.anchor_prompts = anchor_prompts
    return trainer
