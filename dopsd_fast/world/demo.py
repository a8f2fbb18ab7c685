"""`dopsd demo`: fine-tune the shipped 4-step turbo on the new concept word with D-OPSD and with SFT (same
preset, same iterations, LoRA), then measure both, and the gates that make the comparison mean something.

Gate 1: on the concept's under-specified captions the base is clearly less sharp (palette purity) at 4 Euler
steps than at the multi-step schedule, and the turbo closes most of that gap (few-step sampling is hard here
and the turbo has solved it). Gate 2: the turbo with the concept caption + a concept image in its context
draws the concept at 4 steps (the D-OPSD teacher's ceiling).

The report (``format_report``) says what each measure is, gives the table and the gates, and ends with one
PASS/FAIL line per claim, judged by the margins below (which tests/world/test_world_claim.py asserts too).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..method.schedule import Z_IMAGE, shifted_sigmas
from ..progress import progress
from ..sample import sample, save_grid
from ..train.build import check_buildable
from ..train.config import Config, load_config
from .anchor import anchored_trainer
from .bundle import assets_dir, load_dit, load_encoders, load_module
from .metrics import PURITY_EPS, Evaluator, palette_purity
from .scene import (BACKGROUNDS, CONCEPT_COLOUR, CONCEPT_WORD, CONCEPTS, PALETTE, POSITIONS, SHAPES, SIZE, SIZES,
                    caption, concept_pairs, random_scene, random_spec)

SHIFT = 3.0
GATE1_GAP = 0.03        # base: concept purity at the multi-step schedule minus at 4 steps, at least
GATE1_CLOSED = 0.5      # the share of that gap the turbo closes at 4 steps, at least
GATE2_ACC = 0.9         # new-concept acc of the turbo with a concept image in context, at least


@dataclass
class Prompts:
    texts: list[str]
    wants: list[tuple[str | None, str]]   # (shape or None = any, colour) each sample must show
    refs: list[Tensor] | None = None      # context images (teacher path) or None


def concept_prompts(n: int, seed: int, with_images: bool = False, word: str = CONCEPT_WORD) -> Prompts:
    """Half "a zorp" (a style: "a fep <shape>", the shapes in turn), half with one more attribute named; optionally
    each with a concept image in context (prompt i: pair i mod 4, which for a style shows the named shape)."""
    c, rng = CONCEPTS[word], random.Random(seed)
    extra = [f"on a {b} background" for b in BACKGROUNDS] + [f"at the {p}" for p in POSITIONS]
    texts = []
    for i in range(n):
        noun = c.noun(SHAPES[i % len(SHAPES)])
        if i % 2 == 0:
            texts.append(f"a {noun}")
        elif rng.random() < 0.3:
            texts.append(f"a {rng.choice(list(SIZES))} {noun}")
        else:
            texts.append(f"a {noun} {rng.choice(extra)}")
    images = [img for img, _ in concept_pairs(word=word)]
    return Prompts(texts, [(None, c.colour)] * n, [images[i % len(images)] for i in range(n)] if with_images else None)


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
        with progress(total=4, desc=f"evaluating {name}", unit="prompt set") as bar:
            for steps in (4, self.multi):
                new = generate(model, self.encoders, self.concept, steps, self.seed + 3)
                bar.update()
                old = generate(model, self.encoders, self.ordinary, steps, self.seed + 4)
                bar.update()
                self.samples.setdefault(name, {})[steps] = (new, old)
                c, o = score(new, self.concept, self.evaluator), score(old, self.ordinary, self.evaluator)
                rows[steps] = {"new_acc": c["acc"], "new_purity": c["purity"], "old_acc": o["colour_acc"],
                               "old_shape_colour_acc": o["acc"], "old_purity": o["purity"]}
        return rows

    def gates(self, base, turbo) -> dict[str, float]:
        p, with_img = self.concept, concept_prompts(self.n_eval, self.seed + 1, with_images=True)
        runs = [(base, p, 4), (base, p, self.multi), (turbo, p, 4), (turbo, with_img, 4)]
        bar = progress(runs, desc="evaluating the gates", unit="prompt set")
        b4, bm, t4, ceiling = (score(generate(model, self.encoders, prompts, steps, self.seed + 3), prompts,
                                     self.evaluator)["acc" if prompts is with_img else "purity"]
                               for model, prompts, steps in bar)
        closed = (t4 - b4) / (bm - b4) if bm > b4 else float("nan")
        return {"base_purity_4": b4, "base_purity_multi": bm, "turbo_purity_4": t4, "gap_closed": closed,
                "gate1": float(bm - b4 >= GATE1_GAP and closed >= GATE1_CLOSED), "teacher_concept_acc_4": ceiling,
                "gate2": float(ceiling >= GATE2_ACC)}

    def config(self, objective: str) -> Config:
        return load_config("world-demo", [f"method.objective={objective}", f"train.steps={self.iterations}",
                                          f"model.pretrained={assets_dir() / 'turbo'}",
                                          f"train.output_dir={self.out / objective}", *self.overrides])

    def finetune(self, objective: str):
        trainer = anchored_trainer(self.config(objective), self.anchor)
        tic = time.perf_counter()
        history = trainer.train()
        last = history[-20:]
        self.log(f"  {objective}: {len(history)} iterations in {time.perf_counter() - tic:.0f} s, loss "
                 f"{history[0].loss:.4f} (first iteration) -> {sum(h.loss for h in last) / len(last):.4f} (mean of the "
                 f"last {len(last)})")
        return trainer.roles.use("student")

    def run(self) -> dict:
        torch.manual_seed(self.seed)
        base, turbo = load_dit("base"), load_dit("turbo")
        self.log("gates (base vs turbo before fine-tuning) ...")
        gates = self.gates(base, turbo)
        results = {"turbo (before)": self.measure("turbo (before)", turbo)}
        for objective, name in (("sft", "SFT"), ("dopsd", "D-OPSD")):
            self.log(f"fine-tuning with {name} ...")
            results[name] = self.measure(name, self.finetune(objective))
        grids = self.save_grids()
        setup = {"seed": self.seed, "eval_prompts": self.n_eval, "iterations": self.iterations,
                 "multi_steps": self.multi, "anchor": self.anchor}
        return {"setup": setup, "results": results, "gates": gates, "grids": [str(g) for g in grids]}

    def save_grids(self, per_set: int = 8) -> list[Path]:
        """samples-{4,multi}steps.png: a row per model, the first ``per_set`` concept then ordinary prompts as
        columns (labelled with the prompt; 128 px tiles leave room for about 20 characters of it)."""
        paths, prompts = [], self.concept.texts[:per_set] + self.ordinary.texts[:per_set]
        for steps in (4, self.multi):
            rows = [list(s[steps][0][:per_set]) + list(s[steps][1][:per_set]) for s in self.samples.values()]
            paths.append(save_grid(rows, self.out / f"samples-{steps}steps.png", upscale=8,
                                   row_labels=[f"{name}, {steps} steps" for name in self.samples],
                                   col_labels=prompts))
        return paths


# The claims the report ends with, and the margin each must clear (tests/world/test_world_claim.py asserts them on
# 64 prompts; differences at 4 sampler steps unless said, "drop" = the turbo's value minus the model's).
NEW_GAIN = 0.30                 # new-concept acc gained over the turbo
FEW_STEP_MARGIN = 0.05          # concept purity at the multi-step schedule minus at 4 steps: SFT's minus D-OPSD's
SFT_EXTRA_PURITY_DROP = 0.02    # original prompts' purity drop: SFT's minus D-OPSD's
OLD_MARGIN = 0.10               # original colour acc drop D-OPSD may show
SFT_EXTRA_DROP = 0.05           # original colour acc drop: SFT's minus D-OPSD's


def format_report(report: dict) -> str:
    """report.md: what was run, what each measure is, the table, the gates, then one verdict line per claim."""
    setup, results, g = report["setup"], report["results"], report["gates"]
    multi, n = setup["multi_steps"], setup["eval_prompts"]
    anchor = f", anchor term of {setup['anchor']} ordinary captions per iteration" if setup["anchor"] else ""
    lines = [f"# dopsd demo: D-OPSD vs SFT teaching the new word '{CONCEPT_WORD}' to the 4-step turbo",
             "", f"Seed {setup['seed']}, {setup['iterations']} LoRA iterations per method{anchor}; every model samples "
             f"the same {n} prompts per set from the same noise.", "", "Measures:",
             f"- new-concept acc: the share of samples for the concept captions ('a {CONCEPT_WORD}', 'a "
             f"{CONCEPT_WORD} on a grey background', ...) that the evaluator (a small CNN trained on clean and blurred "
             f"renderings of the world) classifies as {CONCEPT_COLOUR}, the colour '{CONCEPT_WORD}' stands for.",
             "- original colour acc / shape+colour acc: the share of samples for ordinary captions ('a red square "
             "...') whose colour / colour and shape the evaluator finds as the caption names them.",
             f"- purity (palette purity): the share of a sample's pixels within {PURITY_EPS / 2:.2f} (largest RGB "
             f"difference, on a 0-1 scale) of one of the world's {len(PALETTE)} colours, averaged over the samples. "
             "Clean renderings score 1.00; blur and in-between colours, what a few-step sampler that was not "
             "distilled draws, lower it: it measures sharpness.",
             f"- steps: Euler steps of the sampler, 4 (what the turbo was distilled for) or {multi} (a multi-step "
             "schedule).", "",
             "| model | sampler steps | new-concept acc | new-concept purity | original colour acc "
             "| original shape+colour acc | original purity |", "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for steps in (4, multi):
            r = rows[steps]
            lines.append(f"| {name} | {steps} | {r['new_acc']:.2f} | {r['new_purity']:.3f} | {r['old_acc']:.2f} "
                         f"| {r['old_shape_colour_acc']:.2f} | {r['old_purity']:.3f} |")
    closed = "no gap to close" if g["gap_closed"] != g["gap_closed"] else f"{g['gap_closed']:.0%} of the gap closed"
    lines += ["", "Gates (what makes the comparison mean something):",
              f"- Gate 1 (few-step sampling is hard, and the turbo solved it): concept-caption purity of the base "
              f"{g['base_purity_4']:.3f} at 4 steps vs {g['base_purity_multi']:.3f} at {multi} "
              f"({GATE1_GAP:.2f} gap needed); "
              f"turbo {g['turbo_purity_4']:.3f} at 4 ({closed}, {GATE1_CLOSED:.0%} needed) -> "
              f"{'PASS' if g['gate1'] else 'FAIL'}",
              f"- Gate 2 (the D-OPSD teacher's ceiling): the turbo with '{CONCEPT_WORD}' + a concept image in its "
              f"context, new-concept acc {g['teacher_concept_acc_4']:.2f} at 4 steps ({GATE2_ACC:.2f} needed) -> "
              f"{'PASS' if g['gate2'] else 'FAIL'}",
              "", "Claims (at 4 steps unless said; drop = the turbo before minus the model):"]
    lines += [f"- {claim}: {evidence} -> {'PASS' if ok else 'FAIL'}" for claim, evidence, ok in claims(results, multi)]
    return "\n".join(lines)


def claims(results: dict, multi: int) -> list[tuple[str, str, bool]]:
    """(claim, the figures behind it, whether its margin is met) for each claim of the demo."""
    turbo, sft, dopsd = (results[k][4] for k in ("turbo (before)", "SFT", "D-OPSD"))
    gap = {k: results[k][multi]["new_purity"] - results[k][4]["new_purity"] for k in ("SFT", "D-OPSD")}
    drop = {k: {m: turbo[m] - r[m] for m in ("old_acc", "old_purity")} for k, r in (("SFT", sft), ("D-OPSD", dopsd))}
    out = []
    for name, r in (("D-OPSD", dopsd), ("SFT", sft)):
        gain = r["new_acc"] - turbo["new_acc"]
        out.append((f"{name} learns the new concept", f"new-concept acc {turbo['new_acc']:.2f} (turbo) -> "
                    f"{r['new_acc']:.2f} ({gain:+.2f}; +{NEW_GAIN:.2f} needed)", gain >= NEW_GAIN))
    out.append(("SFT undoes few-step sampling on the concept and D-OPSD does not",
                f"concept purity at {multi} minus at 4 steps: SFT {gap['SFT']:+.3f}, D-OPSD {gap['D-OPSD']:+.3f} "
                f"(SFT's above 0 and {FEW_STEP_MARGIN:.2f} above D-OPSD's needed)",
                gap["SFT"] > 0 and gap["SFT"] - gap["D-OPSD"] >= FEW_STEP_MARGIN))
    extra = drop["SFT"]["old_purity"] - drop["D-OPSD"]["old_purity"]
    out.append(("SFT lowers the original prompts' sample quality more than D-OPSD",
                f"original purity drop: SFT {drop['SFT']['old_purity']:+.3f}, "
                f"D-OPSD {drop['D-OPSD']['old_purity']:+.3f} "
                f"(SFT's {SFT_EXTRA_PURITY_DROP:.2f} larger needed)", extra >= SFT_EXTRA_PURITY_DROP))
    out.append(("D-OPSD keeps the original prompts' colours", f"original colour acc {turbo['old_acc']:.2f} (turbo) -> "
                f"{dopsd['old_acc']:.2f} (drop {drop['D-OPSD']['old_acc']:+.2f}; at most {OLD_MARGIN:.2f} allowed)",
                drop["D-OPSD"]["old_acc"] <= OLD_MARGIN))
    extra = drop["SFT"]["old_acc"] - drop["D-OPSD"]["old_acc"]
    out.append(("SFT loses more of the original prompts' colours than D-OPSD",
                f"original colour acc drop: SFT {drop['SFT']['old_acc']:+.2f}, D-OPSD {drop['D-OPSD']['old_acc']:+.2f} "
                f"(SFT's {SFT_EXTRA_DROP:.2f} larger needed)", extra >= SFT_EXTRA_DROP))
    return out
