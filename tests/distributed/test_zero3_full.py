"""ZeRO-3 full fine-tuning (adapter.mode=full, the EMA teacher partitioned like the student) on CPU ranks over gloo
against the single-process trainer: losses, grad norms and the student, teacher and AdamW state of every step agree
in fp32, across a resume from a ZeRO-3 checkpoint (from gathering once per iteration to gathering per module); the
single-process trainer resumes that checkpoint to the same step. Both start from a pretrained diffusers folder, so the
ranks build student and teacher partitioned (zero3.build_partitioned, copy_partitioned). 2 ranks each
accumulating 2 iterations per step, and 4 ranks (4 processes on CI's 2 cores).

The reference is the single-process trainer on the same global batches and noise: ``optim.grad_accum = world x`` the
ranks' at ``train.batch_size=1``, so the step's iteration i takes rank i % world's row of global batch i // world
(the stream's next row) and draws that rank's noise (``as_ranks``); the mean of the iterations' gradients is the
mean over ranks and micro batches that DeepSpeed reduces."""
import pytest
import torch

pytest.importorskip("deepspeed")

from ds_launch import diffusers_folder, finish, logged_rows, torchrun  # noqa: E402
from dopsd_fast.testing import tiny_trainer  # noqa: E402
from dopsd_fast.train import checkpoint as ckpt  # noqa: E402
from dopsd_fast.train.checkpoint import load_tensors  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import rank_seed  # noqa: E402

STEPS = 3
# with the self-distillation anchor on (its backwards through the engine, its loss averaged over ranks)
RUN = ["adapter.mode=full", "train.batch_size=1", "optim.warmup_steps=2", "train.checkpoint_every=1",
       "train.report_to=[jsonl]", "method.anchor_per_iteration=1",
       "method.anchor_prompts=[a red circle, a blue square, a green cross]"]


def as_ranks(trainer, world: int, resume=None):
    """The single-process ``trainer`` drawing each iteration's noise as rank ``micro_batch % world`` of ``world``
    does: from that rank's seed, or from its state in the DeepSpeed checkpoint ``resume``. Iteration i of its step is
    the ranks' micro batch i // world on rank i % world: the same row of the same global batch (the stream's next
    row), the same noise and the same anchor captions (drawn by the global index rank + world x micro batch)."""
    noise = [torch.Generator().manual_seed(rank_seed(trainer.cfg.train.seed, r)) for r in range(world)]
    if resume is not None:
        for r, g in enumerate(noise):
            g.set_state(load_tensors(resume / f"rng-rank{r:05d}.safetensors")["noise"])
    inner = trainer.forward_backward_step

    def forward_backward_step(batch):
        trainer.noise = noise[trainer.micro_batch % world]
        return inner(batch)

    trainer.forward_backward_step = forward_backward_step
    return trainer


# fp32, but the ranks' gradients are summed in another order than the iterations' (and DeepSpeed's norm is its own):
# losses and grad norms rel 1e-5. AdamW's m / sqrt(v) turns the rounding of a near-zero gradient element into up
# to ~1e-3 of that element's update (lr 2e-3; seen: 2.1e-6 on 1 of 262144 elements after 3 steps on 4 ranks),
# still 1/200 of one step; the teacher moves 1 - ema_decay = 1/100 of the way to the student per step, so its error
# is ~100x smaller (seen: 2e-8) and a missed EMA update (up to ~2e-5) is 20x its atol.
ATOL = {"student": 1e-5, "teacher": 1e-6, "optimizer": 1e-6}


def assert_same_run(ours, ref, steps) -> None:
    a, b = logged_rows(ours), logged_rows(ref)
    for step in steps:
        assert a[step]["losses"] == pytest.approx(b[step]["losses"], rel=1e-5), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-5), step
        assert a[step]["anchor_loss"] == pytest.approx(b[step]["anchor_loss"], rel=1e-5, abs=1e-12), step
        for part, atol in ATOL.items():
            x, y = (load_tensors(run / f"checkpoints/step-{step:06d}/{part}.safetensors") for run in (ours, ref))
            assert set(x) == set(y), (step, part)
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=atol, msg=f"step {step} {part} {k}")


# 2 ranks with 2 iterations accumulated into each step (optim.grad_accum on DeepSpeed), 4 ranks with one
@pytest.mark.parametrize("world, accum", [(2, 2), (4, 1)])
def test_zero3_full_fine_tuning_equals_single_process(tmp_path, monkeypatch, world, accum):
    zero3, ref, resumed = tmp_path / "zero3", tmp_path / "single", tmp_path / "resumed"
    folder = tmp_path / "transformer"
    diffusers_folder(folder, load_config("tiny-cpu").model.arch)
    single = [*RUN, f"model.pretrained={folder}", "model.arch={}"]
    run = [*single, "deepspeed.stage=3", f"optim.grad_accum={accum}"]
    finish(torchrun(zero3, *run, "train.steps=2", nproc=world))
    # resumes step 2 from DeepSpeed's shards and gathers per module, DeepSpeed's small parameters kept whole
    finish(torchrun(zero3, *run, f"train.steps={STEPS}", "deepspeed.gather_once=false", nproc=world))
    as_ranks(tiny_trainer(ref, *single, f"train.steps={STEPS}", f"optim.grad_accum={world * accum}"), world).train()
    rows = logged_rows(zero3)
    assert sorted(rows) == list(range(1, STEPS + 1))
    # gather-once: student and teacher in one all-gather (one dtype) per iteration, nothing else; step 3 gathers per
    # module (the teacher through its own engine's hooks: its forwards ran on its whole weights, as the equality
    # below shows)
    assert [rows[s]["all_gathers"] == accum for s in rows] == [True, True, False]
    assert_same_run(zero3, ref, range(1, STEPS + 1))

    # the ZeRO-3 checkpoint is the single-process format (whole fp32 tensors by name, the teacher's gathered from
    # its slices): the single-process trainer resumes it and takes the same step 3. It stands in for the ranks by
    # optim.grad_accum = world, the same global batch, a change a resume refuses to a user
    monkeypatch.setattr(ckpt, "RESUMABLE", (*ckpt.RESUMABLE, "optim.grad_accum"))
    step2 = zero3 / "checkpoints" / "step-000002"
    trainer = tiny_trainer(resumed, *single, f"train.steps={STEPS}", f"optim.grad_accum={world * accum}",
                           f"train.resume={step2}")
    as_ranks(trainer, world, resume=step2).train()
    assert_same_run(resumed, ref, [STEPS])
