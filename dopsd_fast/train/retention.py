"""Retention after each stage of a continual plan: the default evaluator and the stage x evaluation table.

An evaluator is called once per row (``start``: the plan's first student before training; then each stage, after it
trained) as ``evaluator(row, trainer, sets, references, out)``: ``sets`` maps a set name (an earlier or the current
stage's name, or ``ordinary``) to its prompts, ``references`` maps it to the folder of the row its samples are
compared with (the stage that taught it; ``ordinary``: the start row), ``out`` is this row's own folder. It returns
set -> metric -> number, which ``write_table`` lays out as one stage x set table per metric. The miniature world
can pass its own evaluator (accuracies, purity) through ``continual.run_plan``.

``PixelRetention`` (the default, no network, no extra model) samples every prompt with the student at the few-step
sampler and at many steps, prompt ``k`` of a set from noise seed ``seed + k`` in every row, and scores with one
cheap pixel statistic, ``mad``: the mean absolute difference of two images after area-averaging both to 32 x 32,
in [0, 1] (0: equal; black vs white: 1). Averaged over a set's prompts:

  drift_few / drift_many   the sample now vs the reference row's sample of the same prompt and noise: how far a
                           concept moved since its stage taught it (forgetting), how far ordinary prompts moved
                           since the start (bleed); 0 in the row that is its own reference
  few_vs_many              few-step vs many-step sample of the same noise: whether the few-step sampler still
                           lands where many steps do (the distillation the tuning must not undo)

The 32 x 32 average keeps layout and colour and drops texture, so the score reads what the grid shows at a glance.
It is a proxy, not a quality metric: a concept can move by a small ``mad`` and still be lost. Each row writes
``samples.safetensors`` (uint8 images, at most 256 px) for later rows' references, ``scores.json`` and ``grid.png``
(columns: every prompt; rows: few steps, many steps, the reference's few-step sample).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sample import save_grid
from . import checkpoint as ckpt

STORED_PX = 256         # stored samples: enough for the grid, ~200 KB each at 1024^2
SCORE_PX = 32           # the statistic's resolution: layout and colour, not texture


def mad(a: Tensor, b: Tensor) -> float:
    """Mean absolute difference of two (3, H, W) uint8 images area-averaged to SCORE_PX^2, in [0, 1]."""
    small = [F.adaptive_avg_pool2d(x.float()[None] / 255, SCORE_PX) for x in (a, b)]
    return float((small[0] - small[1]).abs().mean())


def _stored(image: Tensor) -> Tensor:
    """(3, H, W) in [-1, 1] -> (3, h, w) uint8 with max(h, w) <= STORED_PX."""
    if max(image.shape[-2:]) > STORED_PX:
        scale = STORED_PX / max(image.shape[-2:])
        image = F.interpolate(image[None].float(), size=[max(1, round(n * scale)) for n in image.shape[-2:]],
                              mode="area")[0]
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PixelRetention:
    def __init__(self, few_steps: int | None, many_steps: int, seed: int):
        self.few_steps, self.many_steps, self.seed = few_steps, many_steps, seed

    def __call__(self, row: str, trainer, sets: dict[str, list[str]], references: dict[str, Path],
                 out: Path) -> dict[str, dict[str, float]]:
        few = self.few_steps or trainer.family.inference_steps
        steps = {"few": few, "many": self.many_steps}
        samples = {f"{name}/{kind}/{k}": _stored(self._sample(trainer, prompt, steps[kind], k))
                   for name, prompts in sets.items() for kind in steps for k, prompt in enumerate(prompts)}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "samples.safetensors.tmp"
        ckpt.save_tensors(tmp, samples)
        os.replace(tmp, out / "samples.safetensors")        # a later row reads it as its reference
        scores, grid_rows = {}, [[], [], []]
        for name, prompts in sets.items():
            ref = samples if references[name] == out else ckpt.load_tensors(references[name] / "samples.safetensors")
            keys = [f"{name}/{{}}/{k}" for k in range(len(prompts))]

            def mean_mad(a: dict, kind_a: str, b: dict, kind_b: str) -> float:     # over the set's prompts
                return sum(mad(a[k.format(kind_a)], b[k.format(kind_b)]) for k in keys) / len(keys)
            scores[name] = {"drift_few": mean_mad(samples, "few", ref, "few"),
                            "drift_many": mean_mad(samples, "many", ref, "many"),
                            "few_vs_many": mean_mad(samples, "few", samples, "many")}
            for i, kind in enumerate(("few", "many")):
                grid_rows[i] += [samples[k.format(kind)].float() / 127.5 - 1 for k in keys]
            grid_rows[2] += [ref[k.format("few")].float() / 127.5 - 1 for k in keys]
        columns = [f"{name}: {p}" for name, prompts in sets.items() for p in prompts]
        size = max(grid_rows[0][0].shape[-2:])
        save_grid(grid_rows, out / "grid.png", upscale=max(1, 128 // size), col_labels=columns,
                  row_labels=[f"{row} {few} steps", f"{row} {self.many_steps} steps", f"reference {few} steps"])
        (out / "scores.json").write_text(json.dumps({"row": row, "steps": steps, "seed": self.seed,
                                                     "prompts": sets, "scores": scores}, indent=1))
        return scores

    def _sample(self, trainer, prompt: str, steps: int, k: int) -> Tensor:
        """One prompt at a time (a real model at 1024^2 holds one image's activations), noise seed ``seed + k``."""
        with torch.no_grad():
            return trainer.sample_student([prompt], trainer.sampler_sigmas(steps), seed=self.seed + k)[0]


def write_table(out: Path, rows: list[tuple[str, dict[str, dict[str, float]]]], note: str) -> Path:
    """``retention.json`` and ``retention.md`` in ``out``: one stage x set table per metric; a set a row did not
    evaluate (a later stage's concept) is blank."""
    sets = list(dict.fromkeys(s for _, scores in rows for s in scores))
    metrics = list(dict.fromkeys(m for _, scores in rows for per in scores.values() for m in per))
    (out / "retention.json").write_text(json.dumps({"note": note, "rows": [r for r, _ in rows], "sets": sets,
                                                    "scores": dict(rows)}, indent=1))
    lines = [note]
    for metric in metrics:
        lines += ["", f"**{metric}**", "", "| after \\ set | " + " | ".join(sets) + " |",
                  "|---" * (len(sets) + 1) + "|"]
        for row, scores in rows:
            cells = [f"{scores[s][metric]:.4f}" if metric in scores.get(s, {}) else "" for s in sets]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    path = out / "retention.md"
    path.write_text("\n".join(lines) + "\n")
    return path
