"""Where the colour bleed goes: for the turbo and for world runs (a `dopsd demo --continual` stage folder), the
ordinary prompts' 4-step colour errors as (named colour -> drawn colour) counts, and what each concept word is drawn
as. The prompts and noise are `dopsd demo`'s (seed 0, 128 prompts); writes JSON to stdout.

    python scripts/colour_errors.py turbo outputs/world-demo-continual/d-opsd/01-zorp ... > errors.json
"""
import collections
import json
import sys
from pathlib import Path

import torch

from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.train.run_parts import load_run
from dopsd_fast.world.bundle import assets_dir, load_dit, load_encoders, load_module
from dopsd_fast.world.continual import WORDS
from dopsd_fast.world.demo import concept_prompts, generate, ordinary_prompts
from dopsd_fast.world.metrics import Evaluator


def main(runs: list[str]) -> dict:
    encoders = load_encoders()
    evaluator = load_module(Evaluator(), assets_dir() / "evaluator.safetensors").eval()
    ordinary, out = ordinary_prompts(128, 2), {}
    for run in runs:
        model = load_dit("turbo") if run == "turbo" else load_run(Path(run)).roles.use("student")
        drawn = evaluator.predict(generate(model, encoders, ordinary, 4, 4))["colour"]
        errors = collections.Counter(f"{want} -> {got}" for (_, want), got in zip(ordinary.wants, drawn) if want != got)
        concepts = {w: dict(collections.Counter(evaluator.predict(generate(
            model, encoders, concept_prompts(64, 1, word=w), 4, 3))["colour"]).most_common()) for w in WORDS}
        out[run] = {"ordinary_colour_acc_4": sum(w == g for (_, w), g in zip(ordinary.wants, drawn)) / len(drawn),
                    "ordinary_errors_4": dict(errors.most_common()), "concepts_drawn_as_4": concepts}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    with use_backend("reference"):
        print(json.dumps(main(sys.argv[1:]), indent=1))
