"""`dopsd demo`: fine-tune the shipped 4-step turbo on the new concept word with D-OPSD and with SFT (same
preset, same iterations, LoRA), then measure both, and the gates that make the comparison mean something.

Gate 1: on the concept's under-specified captions the base is clearly less sharp (palette purity) at 4 Euler
steps than at the multi-step schedule, and the turbo closes most of that gap (few-step sampling is hard here
and the turbo has solved it). Gate 2: the turbo with the concept caption + a concept image in its context
draws the concept at 4 steps (the D-OPSD teacher's ceiling).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..method.schedule import Z_IMAGE, shifted_sigmas
from ..sample import sample, save_grid
from ..train.build import check_buildable
from ..train.config import Config, load_config
from .anchor import anchored_trainer
from .bundle import assets_dir, load_dit, load_encoders, load_module
from .metrics import Evaluator, palette_purity
from .scene import BACKGROUNDS, CONCEPT_COLOUR, CONCEPT_WORD, POSITIONS, SIZE, SIZES, caption, concept_pairs, random_scene, random_spec

SHIFT = 3.0


@dataclass
class Prompts:
    texts: list[str]
    wants: list[tuple[str | None, str]]   # (shape or None = any, colour) each sample must show
    refs: list[Tensor] | None = None      # context images (teacher path) or None


def concept_prompts(n: int, seed: int, with_images: bool = False) -> Prompts:
    """Half "a zorp", half with one more attribute named; optionally each with a concept image in context."""
    rng = random.Random(seed)
    extra = [f"on a {b} background" for b in BACKGROUNDS] + [f"at the {p}" for p in POSITIONS]
    texts = []
    for i in range(n):
        if i % 2 == 0:
            texts.append(f"a {CONCEPT_WORD}")
        elif rng.random() < 0.3:
            texts.append(f"a {rng.choice(list(SIZES))} {CONCEPT_WORD}")
        else:
            texts.append(f"a {CONCEPT_WORD} {rng.choice(extra)}")
    images = [img for img, _ in concept_pairs()]
    return Prompts(texts, [(None, CONCEPT_COLOUR)] * n, [images[i % len(images)] for i in range(n)] if with_images else None)


def ordinary_prompts(n: int, seed: int) -> Prompts:
    """Pretraining-style captions that name shape and colour; background, position and size only sometimes."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return Prompts([caption(s, random_spec(rng), rng) for s in scenes], [(s.shape, s.colour) for s in scenes])


@torch.no_grad()
def generate(model, encoders, prompts: Prompts, steps: int, seed: int, batch: int = 64) -> Tensor:
    """(N, 3, S, S) samples; the same seed gives every model the same starting noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts.texts), batch):
        texts = prompts.texts[i:i + batch]
        refs = None if prompts.refs is None else prompts.refs[i:i + batch]
        feats = encoders(texts, refs)
        out += sample(model, Z_IMAGE, feats, (3, 1, SIZE, SIZE), shifted_sigmas(steps, SHIFT), g)
    return torch.stack([x.squeeze(1).clamp(-1, 1) for x in out])


def score(images: Tensor, prompts: Prompts, evaluator: Evaluator) -> dict[str, float]:
    """acc: colour right (and shape, where one is asked for); colour_acc: colour right."""
    pred = evaluator.predict(images)
    colour = [c == w[1] for c, w in zip(pred["colour"], prompts.wants)]
    hit = [ok and (w[0] is None or s == w[0]) for ok, s, w in zip(colour, pred["shape"], prompts.wants)]
    n = len(hit)
    return {"acc": sum(hit) / n, "colour_acc": sum(colour) / n, "purity": palette_purity(images).mean().item()}


class Demo:
    def __init__(self, out: Path, iterations: int = 200, n_eval: int = 128, multi_steps: int = 32, seed: int = 0,
                 overrides: tuple[str, ...] = (), log=print, anchor: int = 0):
        self.out, self.iterations, self.n_eval, self.multi, self.seed = out, iterations, n_eval, multi_steps, seed
        self.anchor = anchor
        self.overrides, self.log = list(overrides), log
        for objective in ("sft", "dopsd"):      # a bad override fails now, not after the gates phase
            check_buildable(self.config(objective))
        self.encoders = load_encoders()
        self.evaluator = load_module(Evaluator(), assets_dir() / "evaluator.safetensors").eval()
        self.concept = concept_prompts(n_eval, seed + 1)
        self.ordinary = ordinary_prompts(n_eval, seed + 2)
        self.samples: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}

    def measure(self, name: str, model) -> dict[int, dict[str, float]]:
        rows = {}
        for steps in (4, self.multi):
            new = generate(model, self.encoders, self.concept, steps, self.seed + 3)
            old = generate(model, self.encoders, self.ordinary, steps, self.seed + 4)
            self.samples.setdefault(name, {})[steps] = (new, old)
            c, o = score(new, self.concept, self.evaluator), score(old, self.ordinary, self.evaluator)
            rows[steps] = {"new_acc": c["acc"], "new_purity": c["purity"], "old_acc": o["colour_acc"],
                           "old_shape_colour_acc": o["acc"], "old_purity": o["purity"]}
        return rows

    def gates(self, base, turbo) -> dict[str, float]:
        p = self.concept
        b4, bm = (score(generate(base, self.encoders, p, s, self.seed + 3), p, self.evaluator)["purity"] for s in (4, self.multi))
        t4 = score(generate(turbo, self.encoders, p, 4, self.seed + 3), p, self.evaluator)["purity"]
        with_img = concept_prompts(self.n_eval, self.seed + 1, with_images=True)
        ceiling = score(generate(turbo, self.encoders, with_img, 4, self.seed + 3), with_img, self.evaluator)["acc"]
        closed = (t4 - b4) / (bm - b4) if bm > b4 else float("nan")
        return {"base_purity_4": b4, "base_purity_multi": bm, "turbo_purity_4": t4, "gap_closed": closed,
                "gate1": float(bm - b4 >= 0.03 and closed >= 0.5), "teacher_concept_acc_4": ceiling,
                "gate2": float(ceiling >= 0.9)}

    def config(self, objective: str) -> Config:
        return load_config("world-demo", [f"method.objective={objective}", f"train.steps={self.iterations}",
                                          f"model.pretrained={assets_dir() / 'turbo'}",
                                          f"train.output_dir={self.out / objective}", *self.overrides])

    def finetune(self, objective: str):
        trainer = anchored_trainer(self.config(objective), self.anchor)
        tic = time.perf_counter()
        history = trainer.train()
        self.log(f"  {objective}: {len(history)} iterations in {time.perf_counter() - tic:.0f} s, "
                 f"loss {history[0].loss:.4f} -> {sum(h.loss for h in history[-20:]) / len(history[-20:]):.4f}")
        return trainer.roles.use("student")

    def run(self) -> dict:
        torch.manual_seed(self.seed)
        base, turbo = load_dit("base"), load_dit("turbo")
        self.log("gates (base vs turbo before fine-tuning) ...")
        gates = self.gates(base, turbo)
        results = {"turbo (before)": self.measure("turbo", turbo)}
        for objective, name in (("sft", "SFT"), ("dopsd", "D-OPSD")):
            self.log(f"fine-tuning with {name} ...")
            results[name] = self.measure(name, self.finetune(objective))
        grids = self.save_grids()
        return {"results": results, "gates": gates, "grids": [str(g) for g in grids]}

    def save_grids(self, per_set: int = 8) -> list[Path]:
        paths = []
        for steps in (4, self.multi):
            rows = [list(s[steps][0][:per_set]) + list(s[steps][1][:per_set]) for s in self.samples.values()]
            paths.append(save_grid(rows, self.out / f"samples-{steps}steps.png", upscale=4))
        return paths


def format_table(report: dict, multi: int) -> str:
    lines = ["| model | steps | new-concept acc | new-concept purity | original colour acc | original shape+colour acc "
             "| original purity |", "|---|---|---|---|---|---|---|"]
    for name, rows in report["results"].items():
        for steps in (4, multi):
            r = rows[steps]
            lines.append(f"| {name} | {steps} | {r['new_acc']:.2f} | {r['new_purity']:.3f} | {r['old_acc']:.2f} "
                         f"| {r['old_shape_colour_acc']:.2f} | {r['old_purity']:.3f} |")
    g = report["gates"]
    lines += ["", f"Gate 1 (few-step sampling is hard, and the turbo solved it), palette purity on the concept captions: "
              f"base {g['base_purity_4']:.3f} at 4 steps vs {g['base_purity_multi']:.3f} at {multi}; turbo "
              f"{g['turbo_purity_4']:.3f} at 4 ("
              f"{'no gap to close' if g['gap_closed'] != g['gap_closed'] else format(g['gap_closed'], '.0%') + ' of the gap closed'}) -> "
              f"{'PASS' if g['gate1'] else 'FAIL'}",
              f"Gate 2 (teacher ceiling): turbo with '{CONCEPT_WORD}' + a concept image at 4 steps, concept acc "
              f"{g['teacher_concept_acc_4']:.2f} (>= 0.90 needed) -> {'PASS' if g['gate2'] else 'FAIL'}"]
    return "\n".join(lines)
