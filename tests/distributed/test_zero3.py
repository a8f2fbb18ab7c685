"""2 CPU ranks over gloo, ZeRO-3 with LoRA roles: gather-once roll-outs against the per-forward gathers (all-gather
count, equal losses, gradients and weights), a resume from a ZeRO-3 checkpoint, and the zero_to_fp32 export."""
import pytest
import torch

pytest.importorskip("deepspeed")

from ds_launch import finish, logged_rows, torchrun  # noqa: E402
from dopsd_fast.train.checkpoint import load_tensors  # noqa: E402

K = 4                 # tiny-cpu: sigmas 1, .9, .75, .5 -> 0
STEPS = 3
# No "persistent" parameters in either run: DeepSpeed would keep the tiny model's (all under its 1e5-element
# threshold) whole on every rank, and the per-forward run would gather nothing.
RUN = [f"train.steps={STEPS}", "train.checkpoint_every=1", "deepspeed.stage=3", "train.report_to=[jsonl]",
       "train.batch_size=2", "optim.warmup_steps=2", "deepspeed.extra={zero_optimization: "
       "{stage3_param_persistence_threshold: 0}}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The per-forward run (3 steps), and the gather-once run stopped after step 2 and resumed for step 3."""
    per_forward, once = tmp_path_factory.mktemp("per_forward"), tmp_path_factory.mktemp("gather_once")
    finish(torchrun(per_forward, *RUN, "deepspeed.gather_once=false"))
    finish(torchrun(once, *RUN, "deepspeed.gather_once=true", "train.steps=2"))
    finish(torchrun(once, *RUN, "deepspeed.gather_once=true"))
    return {"per_forward": per_forward, "gather_once": once}


def test_gather_once_is_one_all_gather_per_iteration(runs):
    once, per_forward = logged_rows(runs["gather_once"]), logged_rows(runs["per_forward"])
    print("all-gathers per iteration, gather-once:", [r["all_gathers"] for r in once.values()],
          "per-forward:", [r["all_gathers"] for r in per_forward.values()])
    # Exactly one: every parameter is fp32 (one dtype, so one coalesced all-gather) and none is persistent (the
    # optimizer step and the EMA on slices gather nothing). Per forward: every teacher forward, student forward
    # and student backward of the K steps fetches its modules' parameters, at least once each.
    assert all(r["all_gathers"] == 1 for r in once.values())
    assert all(r["all_gathers"] >= 3 * K for r in per_forward.values())


def test_gather_once_equals_per_forward_across_a_resume(runs):
    once, per_forward = logged_rows(runs["gather_once"]), logged_rows(runs["per_forward"])
    assert sorted(once) == sorted(per_forward) == list(range(1, STEPS + 1))
    # fp32, same data, noise and reduction order; rtol 1e-5 leaves room for a different summation order only.
    # The step-3 row of the gather-once run comes after a resume from its step-2 checkpoint (optimizer shards,
    # EMA teacher slices, data position and RNG).
    for step in per_forward:
        assert once[step]["losses"] == pytest.approx(per_forward[step]["losses"], rel=1e-5), step
        assert once[step]["grad_norm"] == pytest.approx(per_forward[step]["grad_norm"], rel=1e-5), step
    last = f"checkpoints/step-{STEPS:06d}"
    for part in ("student", "teacher"):
        a = load_tensors(runs["gather_once"] / last / f"{part}.safetensors")
        b = load_tensors(runs["per_forward"] / last / f"{part}.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=f"{part} {k}")


def test_zero_to_fp32_export_matches_student(runs):
    """DeepSpeed's consolidation of the ZeRO-3 optimizer slices gives back the student the checkpoint holds."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir = runs["gather_once"] / "checkpoints" / f"step-{STEPS:06d}"
    exported = get_fp32_state_dict_from_zero_checkpoint(str(step_dir / "deepspeed"), tag="engine",
                                                        exclude_frozen_parameters=True)
    student = load_tensors(step_dir / "student.safetensors")
    assert set(exported) == set(student)
    assert all(torch.equal(exported[k], student[k]) for k in student)
