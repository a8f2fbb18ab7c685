"""The self-distillation anchor (method.anchor_per_iteration, Trainer.self_distil): D-OPSD on ordinary captions
with the teacher given the student's own text-only context."""
import pytest
import torch

from dopsd_fast.testing import randomize_adapters, tiny_trainer
from dopsd_fast.train.config import ConfigError, load_config

ANCHOR = ["method.anchor_per_iteration=2", "method.anchor_prompts=[a red circle, a blue square, a green cross]"]


def test_the_anchor_adds_nothing_while_the_teacher_equals_the_student(tmp_path):
    """At step 1 the EMA teacher is the student (both adapters at their init): on the same context they predict the
    same x0 at every state the student reaches, so the anchor's loss and gradient are exactly 0."""
    plain = tiny_trainer(tmp_path / "plain", "train.steps=1").train()
    anchored = tiny_trainer(tmp_path / "anchored", "train.steps=1", *ANCHOR)
    out = anchored.train()
    assert out[0].anchor_loss == 0.0
    assert out[0].losses == plain[0].losses
    rows = [r for r in (tmp_path / "anchored" / "metrics.jsonl").read_text().splitlines()]
    assert '"anchor_loss": 0.0' in rows[0]


def test_the_anchor_pulls_the_student_toward_the_teacher_on_its_prompts(tmp_path):
    """With student and teacher apart, descending the anchor's gradient alone lowers the anchor's loss on the same
    captions and noise; the trainer's step adds that gradient to the concept's."""
    trainer = tiny_trainer(tmp_path, *ANCHOR)
    randomize_adapters(trainer)
    prompts, params = ["a red circle", "a green cross"], list(trainer.roles.trainable.values())

    def anchor_loss(update: bool) -> float:
        trainer.noise.manual_seed(7)
        for p in params:
            p.grad = None
        loss = trainer.self_distil(prompts).loss
        if update:
            with torch.no_grad():
                for p in params:
                    p -= 0.5 * p.grad
            trainer.roles.trainable_changed()
        return loss

    first = anchor_loss(update=True)
    assert first > 0
    for _ in range(3):
        anchor_loss(update=True)
    assert anchor_loss(update=False) < 0.9 * first


def test_resume_with_the_anchor_reproduces_the_uninterrupted_run(tmp_path):
    common = [*ANCHOR, "train.checkpoint_every=2", "train.batch_size=2", "data.num_pairs=3", "optim.grad_accum=2"]
    straight = tiny_trainer(tmp_path / "a", "train.steps=4", *common).train()
    tiny_trainer(tmp_path / "b", "train.steps=2", *common).train()
    rest = tiny_trainer(tmp_path / "b", "train.steps=4", "train.resume=auto", *common).train()
    assert [(r.losses, r.anchor_loss) for r in rest] == [(r.losses, r.anchor_loss) for r in straight[2:]]
    assert all(r.anchor_loss > 0 for r in straight[1:])         # the teacher lags the student from step 2 on


@pytest.mark.parametrize("sets, key", [
    (["method.anchor_per_iteration=2"], "method.anchor_prompts"),
    (["method.anchor_per_iteration=2", "method.anchor_prompts=[' ']"], "method.anchor_prompts"),
    ([*ANCHOR, "method.objective=sft"], "method.anchor_per_iteration"),
    (["method.anchor_per_iteration=-1"], "method.anchor_per_iteration"),
])
def test_an_anchor_without_prompts_or_on_sft_is_refused(sets, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny-cpu", sets)


def test_the_console_table_shows_the_anchor_loss(tmp_path, capsys):
    from dopsd_fast.cli import main

    assert main(["train", "tiny-cpu", "--no-samples", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                 "--set", "train.steps=2", "--set", "train.log_every=1", "--set", ANCHOR[0], "--set", ANCHOR[1]]) == 0
    header, first = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert header[header.index("anchor")] == "anchor" and first[header.index("anchor")] == "0"   # step 1: 0 exactly
