"""Procedural image-text pairs: the embedded default data set (no downloads, deterministic by seed).

Each scene is one shape of one colour and size at one position on a plain background; each scene has several
caption phrasings (the authors draw one caption variant per iteration from short/medium/detailed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.85), "cyan": (0.1, 0.85, 0.9), "orange": (1.0, 0.55, 0.05), "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "grey": (0.45, 0.45, 0.45), "navy": (0.05, 0.08, 0.3), "beige": (0.85, 0.8, 0.65)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.2, "large": 0.34}
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "centre": (0.5, 0.5)}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def captions(self) -> list[str]:
        s = self
        return [
            f"a {s.colour} {s.shape}",
            f"a {s.size} {s.colour} {s.shape} on a {s.background} background",
            f"a {s.size} {s.colour} {s.shape} in the {s.position} of the picture, plain {s.background} background",
            f"{s.background} backdrop with one {s.colour} {s.shape}, {s.size}, placed at the {s.position}",
        ]


def render(scene: Scene, size: int) -> Tensor:
    """(3, size, size) image in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    cx, cy = POSITIONS[scene.position]
    r = SIZES[scene.size] / 2 * (1.4 if scene.position == "centre" else 1.0)
    dx, dy = xs - cx, ys - cy
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        mask = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    elif scene.shape == "triangle":
        mask = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    else:  # cross
        mask = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    bg = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
    fg = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    img = torch.where(mask, fg, bg)
    return img * 2 - 1


def random_scene(g: torch.Generator) -> Scene:
    def pick(options):
        keys = list(options)
        return keys[int(torch.randint(len(keys), (1,), generator=g))]
    return Scene(pick(SHAPES), pick(COLOURS), pick(BACKGROUNDS), pick(SIZES), pick(POSITIONS))


@dataclass
class Pair:
    image: Tensor            # (3, H, W) in [-1, 1]
    captions: list[str]      # caption variants; one is drawn per iteration


class SyntheticPairs:
    """``num_pairs`` distinct scenes drawn from ``seed``; item i is always the same pair."""

    def __init__(self, num_pairs: int, image_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        scenes: list[Scene] = []
        while len(scenes) < num_pairs:
            s = random_scene(g)
            if s not in scenes or len(scenes) >= 4 * 4 * 5 * 8:
                scenes.append(s)
        self.scenes = scenes
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> Pair:
        return Pair(self.image(i), self.captions(i))

    def captions(self, i: int) -> list[str]:
        return self.scenes[i].captions()

    def image(self, i: int) -> Tensor:
        return render(self.scenes[i], self.image_size)
