"""Procedural 16x16 scenes: one flat-coloured shape on a plain background, captions from a small grammar.

Few-step sampling must be genuinely hard here, so captions under-specify the image: background, position and
size are often left out, and then the image is a draw from a many-mode distribution (4 backgrounds x a
continuous position and size). Rendering is hard-edged with exact palette colours, so a sample's share of
off-palette pixels (metrics.palette_purity) measures blur and mode averaging exactly.

The held-out concept is a word (``CONCEPT_WORD``) bound to one colour, shown on four different shapes and
backgrounds (a colour, not a shape: the shipped 5,000-step base draws colours reliably but shapes only as
blobs). It never occurs in pretraining; the word table of the text encoder is frozen at its random init, so the
new word is as foreign to the model as the nonce words that stand for "an unspecified object" in pretraining.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

SIZE = 16
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.1, 0.85), "cyan": (0.1, 0.85, 0.9)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "grey": (0.5, 0.5, 0.5), "navy": (0.05, 0.1, 0.35),
               "beige": (0.85, 0.78, 0.6)}
POSITIONS = {"left": (4.5, 8.0), "right": (11.5, 8.0), "top": (8.0, 4.5), "bottom": (8.0, 11.5), "centre": (8.0, 8.0)}
SIZES = {"small": (2.6, 3.4), "large": (4.2, 5.2)}          # radius range in pixels
NONCE_WORDS = ("dax", "wug", "blick", "fep", "toma", "kiki", "gorp", "lum")   # "some object" in pretraining
CONCEPT_WORD = "zorp"
CONCEPT_COLOUR = "magenta"                                 # what zorp means (never told to the model)
PALETTE = torch.tensor(list(COLOURS.values()) + list(BACKGROUNDS.values())) * 2 - 1   # (10, 3) in [-1, 1]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str
    cx: float                # object centre in pixels
    cy: float
    radius: float


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None) -> Scene:
    pos, size = rng.choice(list(POSITIONS)), rng.choice(list(SIZES))
    x, y = POSITIONS[pos]
    return Scene(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)),
                 pos, size, x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5), rng.uniform(*SIZES[size]))


def render(s: Scene) -> Tensor:
    """(3, SIZE, SIZE) in [-1, 1]; a pixel is object iff its centre is inside the shape (no anti-aliasing)."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dx, dy, r = xs - s.cx, ys - s.cy, s.radius
    if s.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif s.shape == "square":
        mask = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    elif s.shape == "triangle":
        mask = (dy <= 0.8 * r) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    else:  # cross
        mask = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    fg = torch.tensor(COLOURS[s.colour]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[s.background]).view(3, 1, 1)
    return torch.where(mask, fg, bg) * 2 - 1


@dataclass(frozen=True)
class Spec:
    """Which attributes a caption names; the rest are free (drawn at random in the image)."""
    noun: str | None = None          # None: "<colour> <shape>"; a word: that word stands for the object
    background: bool = False
    position: bool = False
    size: bool = False


def caption(s: Scene, spec: Spec, rng: random.Random) -> str:
    obj = f"{s.colour} {s.shape}" if spec.noun is None else spec.noun
    if spec.size:
        obj = f"{s.size} {obj}"
    parts = [f"a {obj}"]
    if spec.position:
        parts.append(rng.choice([f"at the {s.position}", f"in the {s.position}"]))
    if spec.background and rng.random() < 0.3:      # a second phrasing: background first
        return f"{s.background} background with " + " ".join(parts)
    if spec.background:
        parts.append(rng.choice([f"on a {s.background} background", f"on {s.background}"]))
    return " ".join(parts)


def random_spec(rng: random.Random, p_attr: float = 0.4) -> Spec:
    return Spec(None, rng.random() < p_attr, rng.random() < p_attr, rng.random() < p_attr)


def constrain(s: Scene, spec: Spec, target: Scene) -> Scene:
    """``s`` with the attributes the spec names taken from ``target`` (used to keep a caption true)."""
    out = s
    if spec.background:
        out = replace(out, background=target.background)
    if spec.position:
        out = replace(out, position=target.position, cx=target.cx, cy=target.cy)
    if spec.size:
        out = replace(out, size=target.size, radius=target.radius)
    return out


@dataclass(frozen=True)
class Concept:
    """A held-out word and what it stands for. The shipped world's in-context path carries an image's colour only
    (shapes come out as blobs, backgrounds are not copied), so every concept's meaning the teacher can show, and the
    evaluator scores, is a colour; ``shape`` and ``adjective`` give the pairs the form of a subject or a style."""
    word: str
    colour: str
    shape: str | None = None        # a subject: every pair shows this shape; None: each shape once
    adjective: bool = False         # a style: "a fep circle" (any named shape, in the colour); else the noun "a zorp"

    def noun(self, shape: str) -> str:
        """What a caption names: "zorp", or a style's "fep circle"."""
        return f"{self.word} {shape}" if self.adjective else self.word


# The sequential demo's three concepts (`dopsd demo --continual`). wug and fep are two of pretraining's nonce words,
# which stood for "an unspecified object" there, the untaught state a new token starts in (the shipped encoder's
# vocabulary is fixed).
CONCEPTS = {c.word: c for c in (Concept(CONCEPT_WORD, CONCEPT_COLOUR), Concept("wug", "yellow", shape="cross"),
                                Concept("fep", "cyan", adjective=True))}


def concept_pairs(seed: int = 0, n: int = 4, word: str = CONCEPT_WORD) -> list[tuple[Tensor, str]]:
    """The 4 training pairs of a concept: four scenes (each background once; each shape once unless the concept
    fixes it), captioned by the concept."""
    c, rng = CONCEPTS[word], random.Random(seed)
    pairs = []
    for shape, bg in list(zip(SHAPES, BACKGROUNDS))[:n]:
        s = replace(random_scene(rng, c.shape or shape, c.colour), background=bg)
        pairs.append((render(s), f"a {c.noun(s.shape)}"))
    return pairs
