"""The paper's direction on the miniature world, end to end with the shipped weights (about 1-2 min on 2 cores).

Same preset, same iterations, same evaluation noise for both methods (LoRA on the shipped 4-step turbo):
- D-OPSD raises new-concept accuracy (the concept's colour) at 4 steps by at least NEW_GAIN over the turbo;
- its original-prompt colour accuracy at 4 steps stays within OLD_MARGIN of the turbo's;
- SFT's original-prompt colour accuracy at 4 steps falls by at least SFT_EXTRA_DROP more than D-OPSD's.
"""
import pytest
import torch

pytest.importorskip("transformers")
from dopsd_fast.world.demo import Demo, generate, score  # noqa: E402
from dopsd_fast.world.bundle import load_dit  # noqa: E402

NEW_GAIN = 0.30
OLD_MARGIN = 0.10
SFT_EXTRA_DROP = 0.05
N_EVAL = 64


def test_dopsd_learns_the_concept_at_4_steps_without_breaking_what_sft_breaks(tmp_path):
    demo = Demo(tmp_path, n_eval=N_EVAL, log=lambda *_: None)

    def at_4_steps(model):
        new = generate(model, demo.encoders, demo.concept, 4, demo.seed + 3)
        old = generate(model, demo.encoders, demo.ordinary, 4, demo.seed + 4)
        return score(new, demo.concept, demo.evaluator), score(old, demo.ordinary, demo.evaluator)

    turbo_new, turbo_old = at_4_steps(load_dit("turbo"))
    sft_new, sft_old = at_4_steps(demo.finetune("sft"))
    dopsd_new, dopsd_old = at_4_steps(demo.finetune("dopsd"))
    numbers = (f"new acc turbo/SFT/D-OPSD {turbo_new['acc']:.2f}/{sft_new['acc']:.2f}/{dopsd_new['acc']:.2f}; original "
               f"colour acc {turbo_old['colour_acc']:.2f}/{sft_old['colour_acc']:.2f}/{dopsd_old['colour_acc']:.2f}")
    dopsd_drop = turbo_old["colour_acc"] - dopsd_old["colour_acc"]
    sft_drop = turbo_old["colour_acc"] - sft_old["colour_acc"]
    assert dopsd_new["acc"] - turbo_new["acc"] >= NEW_GAIN, numbers
    assert dopsd_drop <= OLD_MARGIN, numbers
    assert sft_drop - dopsd_drop >= SFT_EXTRA_DROP, numbers
