"""Pretraining and distillation draws: text-only contexts and text + related-image contexts.

A related image shows the same object (shape and colour) in another scene. Half the time the caption then names
the object by a nonce word (or not at all), so the only way to draw the right object is to read it from the
image: this is what gives the base model the in-context ability the D-OPSD teacher relies on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from torch import Tensor

from ..data.synthetic import Pair
from .scene import CONCEPT_WORD, NONCE_WORDS, Spec, caption, concept_pairs, random_scene, random_spec, render


@dataclass
class Draw:
    images: list[Tensor]            # targets (3, S, S) in [-1, 1]
    prompts: list[str]
    refs: list[Tensor | None]       # related image in the context, or None (text only)


def draw(rng: random.Random, n: int, p_ref: float = 0.4, p_null: float = 0.1, p_nonce: float = 0.1) -> Draw:
    images, prompts, refs = [], [], []
    for _ in range(n):
        u = rng.random()
        if u < p_null:                                   # unconditional (also what CFG subtracts)
            s, prompt, ref = random_scene(rng), "", None
        elif u < p_null + p_ref:
            s = random_scene(rng)
            ref = render(random_scene(rng, s.shape, s.colour))
            spec = random_spec(rng)
            v = rng.random()
            if v < 0.4:
                spec = Spec(rng.choice(NONCE_WORDS), spec.background, spec.position, spec.size)
            prompt = "" if v > 0.85 else caption(s, spec, rng)
        else:
            s, ref = random_scene(rng), None
            spec = random_spec(rng)
            if rng.random() < p_nonce:                   # an unknown word leaves the object unspecified
                spec = Spec(rng.choice(NONCE_WORDS), spec.background, spec.position, spec.size)
            prompt = caption(s, spec, rng)
        images.append(render(s))
        prompts.append(prompt)
        refs.append(ref)
    return Draw(images, prompts, refs)


class ConceptPairs:
    """A concept's 4 image-text pairs as a data set for the trainer (``data.kind: world``; ``data.path`` names the
    concept, scene.CONCEPTS, default zorp)."""

    def __init__(self, seed: int = 6, word: str | None = None):
        self.pairs = concept_pairs(seed, word=word or CONCEPT_WORD)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return Pair(self.image(i), self.captions(i))

    def captions(self, i: int) -> list[str]:
        return [self.pairs[i][1]]

    def image(self, i: int) -> Tensor:
        return self.pairs[i][0]
