"""The paper's direction on the miniature world, end to end with the shipped weights (3 fine-tunes, ~4 min).

Same preset, same iterations, same evaluation noise for both methods (LoRA on the shipped 4-step turbo). Asserted:
- D-OPSD raises new-concept accuracy (the concept's colour) at 4 steps by at least NEW_GAIN over the turbo;
- few-step sampling: SFT leaves its new-concept samples clearly less sharp (palette purity) at 4 steps than at the
  multi-step schedule, D-OPSD keeps the turbo's few-step behaviour (its gap is at least FEW_STEP_MARGIN smaller);
- original prompts' 4-step sample quality (purity) falls by at least SFT_EXTRA_PURITY_DROP more under SFT;
- with an anchor term (`--anchor 4`: ordinary captions self-distilled beside the concept), D-OPSD also keeps the
  original prompts' 4-step colour accuracy within OLD_MARGIN (demo seed 0: 1.00 -> 1.00, purity 0.860 -> 0.861).

Not shown (xfail, with the numbers; reported on issue 6): without an anchor, the accuracy form of the original-prompt
claims. D-OPSD carries the concept's colour into ordinary prompts more than SFT does. `dopsd demo`, 128 prompts, seeds
0/1/2, 4 steps: original colour accuracy turbo 1.00/0.99/1.00 -> SFT 0.95/0.95/0.95 -> D-OPSD 0.80/0.82/0.84 (with
`--anchor 4`, seed 0: SFT 0.99, D-OPSD 1.00). The asserted ones there: concept purity at 32 minus 4 steps SFT
+0.07/+0.10/+0.09, D-OPSD -0.17/-0.16/-0.18 (the turbo before -0.18/-0.17/-0.17); original 4-step purity turbo
0.86/0.86/0.86 -> SFT 0.77/0.73/0.72 -> D-OPSD 0.84/0.82/0.82.
"""
import pytest

pytest.importorskip("transformers")
from dopsd_fast.ops._dispatch import use_backend  # noqa: E402
from dopsd_fast.world.bundle import load_dit  # noqa: E402
from dopsd_fast.world.demo import (FEW_STEP_MARGIN, NEW_GAIN, OLD_MARGIN, SFT_EXTRA_DROP,  # noqa: E402
                                   SFT_EXTRA_PURITY_DROP, Demo, generate, score)

# the margins are the demo report's claims' (dopsd_fast/world/demo.py)
N_EVAL = 64
ANCHOR = 4
MULTI = 32


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("world"), n_eval=N_EVAL, log=lambda *_: None)

    def measure(model):
        new = {s: score(generate(model, demo.encoders, demo.concept, s, demo.seed + 3), demo.concept, demo.evaluator)
               for s in (4, MULTI)}
        old = generate(model, demo.encoders, demo.ordinary, 4, demo.seed + 4)
        return {"new": new[4], "new_gap": new[MULTI]["purity"] - new[4]["purity"],
                "old": score(old, demo.ordinary, demo.evaluator)}

    # module scope runs outside conftest's per-test backend pin: pin the reference ops here (not the interpreter)
    anchored = Demo(tmp_path_factory.mktemp("world-anchor"), n_eval=N_EVAL, log=lambda *_: None, anchor=ANCHOR)
    with use_backend("reference"):
        m = {"turbo": measure(load_dit("turbo")), "sft": measure(demo.finetune("sft")),
             "dopsd": measure(demo.finetune("dopsd")), "dopsd_anchor": measure(anchored.finetune("dopsd"))}
    names = ("turbo", "sft", "dopsd", "dopsd_anchor")
    m["numbers"] = ("turbo/SFT/D-OPSD/D-OPSD+anchor at 4 steps: new acc " + "/".join(f"{m[k]['new']['acc']:.2f}" for k in names)
                    + "; original colour acc " + "/".join(f"{m[k]['old']['colour_acc']:.2f}" for k in names)
                    + "; original purity " + "/".join(f"{m[k]['old']['purity']:.3f}" for k in names)
                    + f"; concept purity {MULTI}-step minus 4-step " + "/".join(f"{m[k]['new_gap']:+.3f}" for k in names))
    return m


def drop(m, method, key):
    return m["turbo"]["old"][key] - m[method]["old"][key]


def test_dopsd_learns_the_new_concept_at_4_steps(measured):
    assert measured["dopsd"]["new"]["acc"] - measured["turbo"]["new"]["acc"] >= NEW_GAIN, measured["numbers"]


def test_sft_breaks_few_step_sampling_of_the_concept_and_dopsd_does_not(measured):
    sft, dopsd = measured["sft"]["new_gap"], measured["dopsd"]["new_gap"]
    assert sft > 0 and sft - dopsd >= FEW_STEP_MARGIN, measured["numbers"]


def test_sft_degrades_original_prompts_4_step_quality_more_than_dopsd(measured):
    extra = drop(measured, "sft", "purity") - drop(measured, "dopsd", "purity")
    assert extra >= SFT_EXTRA_PURITY_DROP, measured["numbers"]


def test_with_an_anchor_dopsd_learns_the_concept_and_keeps_original_prompts(measured):
    m = measured
    assert m["dopsd_anchor"]["new"]["acc"] - m["turbo"]["new"]["acc"] >= NEW_GAIN, m["numbers"]
    assert drop(m, "dopsd_anchor", "colour_acc") <= OLD_MARGIN, m["numbers"]
    assert m["sft"]["new_gap"] - m["dopsd_anchor"]["new_gap"] >= FEW_STEP_MARGIN, m["numbers"]


UNMET = ("not shown on the shipped world: D-OPSD without an anchor bleeds the concept colour into ordinary prompts "
         "more than SFT (see the module docstring)")


@pytest.mark.xfail(reason=UNMET, strict=False)
def test_dopsd_keeps_original_prompts_accuracy_at_4_steps(measured):
    assert drop(measured, "dopsd", "colour_acc") <= OLD_MARGIN, measured["numbers"]


@pytest.mark.xfail(reason=UNMET, strict=False)
def test_sft_breaks_original_prompts_accuracy_more_than_dopsd(measured):
    assert drop(measured, "sft", "colour_acc") - drop(measured, "dopsd", "colour_acc") >= SFT_EXTRA_DROP, \
        measured["numbers"]
