"""The paper's direction on the miniature world, end to end with the shipped weights (about 2-3 min on 2 cores).

Same preset, same iterations, same evaluation noise for both methods (LoRA on the shipped 4-step turbo):
- D-OPSD raises new-concept accuracy (the concept's colour) at 4 steps by at least NEW_GAIN over the turbo;
- its original-prompt colour accuracy at 4 steps stays within OLD_MARGIN of the turbo's;
- SFT's original-prompt colour accuracy at 4 steps falls by at least SFT_EXTRA_DROP more than D-OPSD's.

The last two do NOT hold on the shipped world (marked xfail with the measured numbers, reported on issue 6):
without an anchor D-OPSD carries the concept's colour into ordinary prompts more than SFT does
(`dopsd demo`, 128 prompts: original colour acc 0.98 turbo -> 0.82 SFT -> 0.43 D-OPSD at lr 1e-3;
0.96 / 0.62 at lr 2e-4); with `--anchor 4` both keep it (0.98 / 0.99) and SFT no longer falls further.
"""
import pytest

pytest.importorskip("transformers")
from dopsd_fast.ops._dispatch import use_backend  # noqa: E402
from dopsd_fast.world.bundle import load_dit  # noqa: E402
from dopsd_fast.world.demo import Demo, generate, score  # noqa: E402

NEW_GAIN = 0.30
OLD_MARGIN = 0.10
SFT_EXTRA_DROP = 0.05
N_EVAL = 64


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("world"), n_eval=N_EVAL, log=lambda *_: None)

    def at_4_steps(model):
        new = generate(model, demo.encoders, demo.concept, 4, demo.seed + 3)
        old = generate(model, demo.encoders, demo.ordinary, 4, demo.seed + 4)
        return score(new, demo.concept, demo.evaluator), score(old, demo.ordinary, demo.evaluator)

    # module scope runs outside conftest's per-test backend pin: pin the reference ops here (not the interpreter)
    with use_backend("reference"):
        m = {"turbo": at_4_steps(load_dit("turbo")), "sft": at_4_steps(demo.finetune("sft")),
             "dopsd": at_4_steps(demo.finetune("dopsd"))}
    m["numbers"] = (f"new acc turbo/SFT/D-OPSD {m['turbo'][0]['acc']:.2f}/{m['sft'][0]['acc']:.2f}/"
                    f"{m['dopsd'][0]['acc']:.2f}; original colour acc {m['turbo'][1]['colour_acc']:.2f}/"
                    f"{m['sft'][1]['colour_acc']:.2f}/{m['dopsd'][1]['colour_acc']:.2f}")
    return m


def drop(m, method):
    return m["turbo"][1]["colour_acc"] - m[method][1]["colour_acc"]


def test_dopsd_learns_the_new_concept_at_4_steps(measured):
    assert measured["dopsd"][0]["acc"] - measured["turbo"][0]["acc"] >= NEW_GAIN, measured["numbers"]


UNMET = ("not shown on the shipped world: D-OPSD without an anchor bleeds the concept colour into ordinary prompts "
         "(demo: original colour acc 0.98 -> 0.43, SFT 0.82); see the module docstring")


@pytest.mark.xfail(reason=UNMET, strict=False)
def test_dopsd_keeps_original_prompts_at_4_steps(measured):
    assert drop(measured, "dopsd") <= OLD_MARGIN, measured["numbers"]


@pytest.mark.xfail(reason=UNMET, strict=False)
def test_sft_breaks_original_prompts_more_than_dopsd(measured):
    assert drop(measured, "sft") - drop(measured, "dopsd") >= SFT_EXTRA_DROP, measured["numbers"]
