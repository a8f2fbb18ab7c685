"""`dopsd demo --continual` on one seed: the default arm (D-OPSD + self-distillation anchor) against SFT + replay,
three concepts in turn (zorp, wug, fep), the settings of README's run (100 iterations per stage, 64 prompts per set;
2 arms x 3 stages, 195 s of CPU on one thread on the shared development machine).

Asserted (the claims of dopsd_fast/world/continual.py): Gate 2 for each concept's colour; the default arm learns
each concept at its stage, keeps ordinary prompts' colours after every stage (no bleed), and SFT + replay undoes
more of the few-step sampler on ordinary prompts after every stage.

Not shown (xfail, with the numbers of results/world/2026-12-05-continual-seed0/, seed 0): the issue's targets that
each earlier concept keeps >= 0.9 after the third stage (zorp 0.00, wug 0.00: every arm forgets, because the text
encoder's features for "a zorp", "a wug" and "a fep circle" nearly coincide, cosine 0.93-0.96), and that ordinary
prompts' 4-step purity stays within 0.02 of the turbo's (0.858 -> 0.846 -> 0.835 after the three stages; a marginal
miss: a second run of these settings, with float-level differences from the code it ran on, landed within 0.02 and
XPASSed; seeds 1 and 2 meet it, results/world/2026-12-05-continual-seed{1,2}/).
Measured there, asserted here: concept gains over the turbo +0.86 / +0.75 / +0.77; ordinary colour acc 1.00 after
every stage; ordinary purity at 32 minus 4 steps SFT + replay +0.051 / +0.020 / +0.033, D-OPSD + self-distil
-0.194 / -0.195 / -0.189.
"""
import pytest

pytest.importorskip("transformers")
from dopsd_fast.ops._dispatch import use_backend  # noqa: E402
from dopsd_fast.world.continual import DEFAULT_ARM, WORDS, ContinualDemo, claims  # noqa: E402
from dopsd_fast.world.demo import GATE2_ACC  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    demo = ContinualDemo(tmp_path_factory.mktemp("continual"), arms=(DEFAULT_ARM, "SFT + replay"), log=lambda *_: None)
    with use_backend("reference"):       # module scope runs outside conftest's per-test backend pin
        return demo.run()


def verdict(report, start: str) -> None:
    """Assert the claim whose text starts with ``start`` (claims() phrases them; its figures are the message)."""
    (evidence, ok), = [(e, ok) for c, e, ok in claims(report) if c.startswith(start)]
    assert ok, evidence


def test_the_teacher_shows_every_concept_colour(report):
    accs = {w: report["gates"][f"teacher_{w}_acc_4"] for w in WORDS}
    assert min(accs.values()) >= GATE2_ACC, accs


def test_dopsd_learns_each_concept_at_its_stage(report):
    verdict(report, f"{DEFAULT_ARM} learns each concept")


def test_dopsd_keeps_ordinary_colours_after_every_stage(report):
    verdict(report, f"{DEFAULT_ARM} keeps ordinary prompts' colours")


def test_sft_undoes_more_of_the_few_step_sampler_after_every_stage(report):
    verdict(report, "SFT + replay undoes more")


@pytest.mark.xfail(reason="not shown: the concept words' caption features nearly coincide (module docstring)",
                   strict=False)
def test_dopsd_keeps_earlier_concepts_after_the_last_stage(report):
    verdict(report, f"{DEFAULT_ARM} keeps the earlier concepts")


@pytest.mark.xfail(reason="not shown: 4-step purity of ordinary prompts drifts down stage by stage (module docstring)",
                   strict=False)
def test_dopsd_keeps_ordinary_purity_after_the_last_stage(report):
    verdict(report, f"{DEFAULT_ARM} keeps ordinary prompts' 4-step purity")
