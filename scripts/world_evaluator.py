"""Train the world's evaluator (shape / colour / background classifier) on renderings with noise and blur.

    python scripts/world_evaluator.py --out dopsd_fast/world/assets
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd_fast.world.bundle import save_module, update_manifest
from dopsd_fast.world.metrics import Evaluator
from dopsd_fast.world.scene import BACKGROUNDS, COLOURS, SHAPES, random_scene, render


def batch(rng: random.Random, g: torch.Generator, n: int):
    scenes = [random_scene(rng) for _ in range(n)]
    x = torch.stack([render(s) for s in scenes])
    blur = torch.rand(n, 1, 1, 1, generator=g) * 0.6                 # mix with a 3x3 box blur
    x = (1 - blur) * x + blur * F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.15
    y = {"shape": [SHAPES.index(s.shape) for s in scenes], "colour": [list(COLOURS).index(s.colour) for s in scenes],
         "background": [list(BACKGROUNDS).index(s.background) for s in scenes]}
    return x, {k: torch.tensor(v) for k, v in y.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="dopsd_fast/world/assets")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng, g = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(1, a.steps + 1):
        x, y = batch(rng, g, 128)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    x, y = batch(random.Random(a.seed + 1), torch.Generator().manual_seed(a.seed + 1), 1024)
    with torch.no_grad():
        acc = {k: (v.argmax(-1) == y[k]).float().mean().item() for k, v in model(x).items()}
    print("held-out accuracy", acc)
    out = Path(a.out)
    digest = save_module(model, out / "evaluator.safetensors")
    update_manifest(out, "evaluator", {"script": "scripts/world_evaluator.py", "args": vars(a), "held_out_accuracy": acc,
                                       "sha256": {"evaluator.safetensors": digest}})


if __name__ == "__main__":
    main()
