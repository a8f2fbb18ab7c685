"""`dopsd demo`'s report: it says what it measured and how, labels its numbers, and ends with one verdict per claim;
its grids are labelled. No fine-tuning here (tests/world/test_world_claim.py runs the demo's claims)."""
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from dopsd_fast.world.demo import Demo, claims, format_report  # noqa: E402

# `dopsd demo` seed 0 (README): concept acc, concept purity at 4 / 32 steps, original colour acc, original purity
SEED0 = {"turbo (before)": (0.16, 0.83, 0.65, 1.00, 0.86), "SFT": (1.00, 0.80, 0.86, 0.95, 0.77),
         "D-OPSD": (1.00, 0.82, 0.65, 0.80, 0.84)}


def report(anchor: int = 0) -> dict:
    results = {name: {steps: {"new_acc": acc, "new_purity": p, "old_acc": old, "old_shape_colour_acc": old - 0.1,
                              "old_purity": old_purity} for steps, p in ((4, p4), (32, p32))}
               for name, (acc, p4, p32, old, old_purity) in SEED0.items()}
    gates = {"base_purity_4": 0.80, "base_purity_multi": 0.85, "turbo_purity_4": 0.83, "gap_closed": 0.6, "gate1": 1.0,
             "teacher_concept_acc_4": 1.0, "gate2": 1.0}
    setup = {"seed": 0, "eval_prompts": 128, "iterations": 200, "multi_steps": 32, "anchor": anchor}
    return {"setup": setup, "results": results, "gates": gates, "grids": []}


def test_report_defines_its_measures_and_ends_with_a_verdict_per_claim():
    text = format_report(report())
    assert "purity (palette purity): the share of a sample's pixels within 0.12" in text
    assert "new-concept acc: the share of samples" in text and "Gate 1" in text and "Gate 2" in text
    verdicts = text.splitlines()[-len(claims(report()["results"], 32)):]
    assert [line.rsplit("-> ", 1)[1] for line in verdicts] == ["PASS"] * 4 + ["FAIL"] * 2     # README's seed 0
    assert verdicts[-2].startswith("- D-OPSD keeps the original prompts' colours: original colour acc 1.00 (turbo)")
    assert "anchor term of 4" in format_report(report(anchor=4))


def test_demo_grids_label_rows_and_columns(tmp_path):
    demo = Demo(tmp_path, n_eval=8, multi_steps=8, log=lambda *_: None)
    images = torch.zeros(8, 3, 16, 16)
    demo.samples = {name: {steps: (images, images) for steps in (4, 8)} for name in SEED0}
    for path in demo.save_grids():
        width, height = Image.open(path).size
        assert width > 16 * (16 * 8 + 2) and height > 3 * (16 * 8 + 2)       # margins for the models and prompts


def test_continual_arms_are_chosen_by_name_and_an_unknown_one_exits_2(tmp_path, capsys):
    from dopsd_fast.cli import main
    from dopsd_fast.world.continual import arms_named

    assert arms_named("d-opsd, sft-replay") == ("SFT + replay", "D-OPSD")      # ARMS' order
    assert main(["demo", "--continual", "--arms", "d-opsd,nope", "--out", str(tmp_path / "x")]) == 2
    assert "--arms: nope is not one of sft, sft-replay, d-opsd" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
