"""The DeepSpeed engine path in one process (a world of one, gloo): K + 1 micro-backwards through engine.backward
and one engine.step() give what one backward of the mean loss gives in the plain trainer, on ZeRO 1, 2 and 3; a
NaN/Inf step updates nothing and drops its gradients as the plain trainer does, on ZeRO 0, 2 and 3; a resume reads
DeepSpeed's shards weights-only, refusing a planted pickle payload without running it."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

import deepspeed.comm  # noqa: E402,F401  (registers deepspeed.comm.torch)

# gloo does the collectives; skip the CPU shm op DeepSpeed would JIT-build first (~25 s, more on a busy machine)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

from dopsd_fast.models.loading import first_nonfinite  # noqa: E402
from dopsd_fast.ops._dispatch import use_backend  # noqa: E402
from dopsd_fast.testing import tiny_trainer  # noqa: E402
from dopsd_fast.train.checkpoint import CheckpointError, list_checkpoints  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import destroy_process_group  # noqa: E402
from dopsd_fast.train.finite import TrainingDiverged  # noqa: E402

COMMON = ["train.steps=3", "train.batch_size=2", "optim.warmup_steps=2", "train.checkpoint_every=100",
          "train.report_to=[jsonl]"]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The trainers here share this process's group (a world of one): leave it before the process exits."""
    yield
    destroy_process_group()


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def held_all_graphs(tmp_path_factory):
    """Reference: the plain trainer, all K graphs held and ONE backward of the mean loss."""
    out = tmp_path_factory.mktemp("ref")
    with use_backend("reference"):      # a module fixture runs outside conftest's per-test backend switch
        tiny_trainer(out, "method.per_step_backward=false", *COMMON).train()
    return rows(out)


# ZeRO-3 in a world of one partitions nothing away, but runs its hooks, gradient partitions and the EMA on slices;
# gather_once=false keeps DeepSpeed's "persistent" small parameters (all of the tiny model's), whose EMA slices
# are re-gathered after each update. The 2-process ZeRO-3 runs are in test_zero3.py.
@pytest.mark.parametrize("stage, sets", [(1, []), (2, []), (3, []), (3, ["deepspeed.gather_once=false"])],
                         ids=["zero1", "zero2", "zero3", "zero3-per-forward"])
def test_micro_backwards_equal_one_backward_of_the_mean_loss(tmp_path, held_all_graphs, stage, sets):
    tiny_trainer(tmp_path, f"deepspeed.stage={stage}", "method.per_step_backward=true", *sets, *COMMON).train()
    ours = rows(tmp_path)
    # fp32; the gradient sums run in another order (K + 1 accumulations vs one backward): rtol 1e-5. The step-1
    # grad norm checks the accumulated gradient itself; later losses check the updates AdamW made from it.
    for a, b in zip(ours, held_all_graphs):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert "comm_s" in ours[0]


def test_zero3_checkpoint_resumes_on_zero2_only_from_safetensors(tmp_path):
    """Another stage never reaches DeepSpeed's shards (it fails on ZeRO-3 shards with a bare assert): it resumes
    from the safetensors state (test_deepspeed_reshard.py), which a checkpoint of an older version lacks."""
    step = tmp_path / "step-000001"
    step.mkdir()
    zero3 = load_config("tiny-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", "deepspeed.stage=3", *COMMON])
    (step / "state.json").write_text(json.dumps({"step": 1, "data": {"epoch": 0, "position": 1}, "world_size": 1, "config": zero3.to_dict()}))
    trainer = tiny_trainer(tmp_path, "deepspeed.stage=2", *COMMON)
    with pytest.raises(CheckpointError, match="1 rank\\(s\\) on ZeRO-3 without optimizer.safetensors .* resume it "
                       "with 1 rank\\(s\\) and deepspeed.stage=3"):
        trainer.load(step)


# ---------------------------------------------------------------- NaN/Inf (train/finite.py)
# A bad step runs engine.step() with AdamW's own step left out: nothing is updated and the accumulated gradients
# (ZeRO partitions included) are dropped. In this module: a second in-process DeepSpeed module cannot create its
# process group again after this one's teardown.

@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
def test_lr_1e30_skips_then_stops_and_every_checkpoint_is_finite(tmp_path, stage):
    tr = tiny_trainer(tmp_path, f"deepspeed.stage={stage}", "optim.lr=1e30", "train.steps=8", "train.batch_size=2",
                      "train.checkpoint_every=1", "train.keep_last=8", "train.report_to=[jsonl]")
    with pytest.raises(TrainingDiverged, match="steps 2-4: 3 steps in a row"):
        tr.train()
    assert [(r["skipped"], r["bad_steps"]) for r in rows(tmp_path)] == [(False, 0), (True, 1), (True, 2), (True, 3)]
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    for ckpt in list_checkpoints(root):
        for f in ckpt.glob("*.safetensors"):
            assert first_nonfinite(load_file(str(f))) is None, f
    first, last = (load_file(str(root / s / "student.safetensors")) for s in ("step-000001", "step-000003"))
    assert all(torch.equal(first[k], last[k]) for k in first)      # the skipped steps updated nothing
    assert json.loads((root / "step-000003" / "state.json").read_text())["bad_steps"] == {"total": 2, "streak": 2}


def nan_loss_at(trainer, step: int):
    """The trainer, reporting a NaN loss for step ``step`` while its gradients stay finite: only the loss check
    can skip that update (DeepSpeed's own overflow check would apply it)."""
    inner = trainer.forward_backward_step

    def forward_backward_step(batch):
        out = inner(batch)
        if trainer.step + 1 == step:
            out.loss = float("nan")
        return out

    trainer.forward_backward_step = forward_backward_step
    return trainer


SKIP_RUN = ["train.steps=4", "train.batch_size=2", "train.checkpoint_every=100", "train.report_to=[jsonl]"]


@pytest.fixture(scope="module")
def plain_skip_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_skip")
    with use_backend("reference"):
        nan_loss_at(tiny_trainer(out, *SKIP_RUN), 2).train()
    return rows(out)


@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
def test_a_skipped_step_drops_its_gradients_as_the_plain_trainer_does(tmp_path, plain_skip_rows, stage):
    """Step 2's gradients are finite but its loss is not: steps 3 and 4 match the plain trainer's (which zeroes
    the gradients). Applying step 2 changes step 3's loss; skipping engine.step() instead leaves step 2's
    gradients to add into step 3's (its grad norm, step 4's loss)."""
    nan_loss_at(tiny_trainer(tmp_path, f"deepspeed.stage={stage}", *SKIP_RUN), 2).train()
    ours = rows(tmp_path)
    assert [r["skipped"] for r in ours] == [r["skipped"] for r in plain_skip_rows] == [False, True, False, False]
    for a, b in zip(ours[2:], plain_skip_rows[2:]):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
        if a["grad_norm"] is not None:      # ZeRO-0 in fp32: DeepSpeed reports none
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


class Payload:
    """A pickle that runs code when loaded: ``open(marker, "w")`` creates the marker file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_resume_reads_deepspeed_shards_without_running_their_pickles(tmp_path, monkeypatch, stage):
    """train.resume=<path> with a payload planted in DeepSpeed's model states: refused naming the file, and the
    payload never ran; the untouched checkpoint resumes with every torch.load weights-only."""
    run = [f"deepspeed.stage={stage}", "train.batch_size=2", "train.checkpoint_every=1", "train.report_to=[jsonl]"]
    tiny_trainer(tmp_path / "src", *run, "train.steps=1").train()
    src = tmp_path / "src" / "checkpoints" / "step-000001"
    good = tmp_path / "good"
    shutil.copytree(src, good)
    (states,) = (src / "deepspeed" / "engine").glob("*mp_rank_00_model_states.pt")
    marker = tmp_path / "payload-ran"
    torch.save({"module": Payload(marker), "buffer_names": []}, states)

    with pytest.raises(CheckpointError, match=f"{states}: refused to unpickle"):
        tiny_trainer(tmp_path / "bad", *run, "train.steps=2", f"train.resume={src}").train()
    assert not marker.exists()

    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    tiny_trainer(tmp_path / "resumed", *run, "train.steps=2", f"train.resume={good}").train()
    assert [r["step"] for r in rows(tmp_path / "resumed")] == [2]
    assert loads and all(w is True for w in loads), loads
    assert not marker.exists()


ACCUM = ["train.steps=3", "optim.warmup_steps=2", "optim.scheduler=linear", "data.num_pairs=3",
         "train.checkpoint_every=100", "train.report_to=[jsonl]"]


@pytest.fixture(scope="module")
def plain_batch_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    with use_backend("reference"):      # a module fixture runs outside conftest's per-test backend switch
        tiny_trainer(out, "train.batch_size=2", *ACCUM).train()
    return rows(out)


@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
def test_grad_accum_2_at_batch_1_is_the_plain_trainer_at_batch_2(tmp_path, plain_batch_2, stage):
    """optim.grad_accum under DeepSpeed: rank 0 draws the plain trainer's pairs and noise; the step's two iterations
    backpropagate with weight 1/2 (the caption path's leaf gradient carries it once) into the engine's gradients
    before one engine.step(): losses and grad norms agree with batch 2 to fp32 rounding (seen: 1e-6; rel 1e-5)."""
    tiny_trainer(tmp_path, f"deepspeed.stage={stage}", "train.batch_size=1", "optim.grad_accum=2", *ACCUM).train()
    ours = rows(tmp_path)
    assert [r["lr"] for r in ours] == [r["lr"] for r in plain_batch_2]
    for a, b in zip(ours, plain_batch_2, strict=True):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
        if a["grad_norm"] is not None:      # ZeRO-0 in fp32: DeepSpeed reports none
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------- a disk that refuses the checkpoint
@pytest.mark.parametrize("where", ["shards", "safetensors", "bug"])
def test_a_full_disk_while_saving_exits_2_naming_the_checkpoint(tmp_path, monkeypatch, where):
    """DeepSpeed's own shards (torch.save: a RuntimeError of its stream writer) or our safetensors (OSError) meeting a
    full disk: a CheckpointError naming the checkpoint and the fix (the CLI's exit 2), no checkpoint published and
    its pending folder gone; any other RuntimeError is not the disk's and comes through as it was."""
    import errno
    import os

    from dopsd_fast.train import checkpoint as ckpt

    trainer = tiny_trainer(tmp_path, "deepspeed.stage=2", "train.steps=1", "train.checkpoint_every=1",
                           "train.report_to=[jsonl]")
    if where == "safetensors":
        def refuse(path, tensors):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(ckpt, "save_tensors", refuse)
    else:
        text = ("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file "
                "write failed" if where == "shards" else "an unrelated bug")

        def refuse(*args, **kwargs):
            raise RuntimeError(text)
        monkeypatch.setattr(trainer.engine, "save_checkpoint", refuse)
    if where == "bug":
        with pytest.raises(RuntimeError, match="an unrelated bug"):
            trainer.train()
        return
    with pytest.raises(CheckpointError, match="step-000001: not written: .*(disk is full|write failed)"):
        trainer.train()
    root = trainer.checkpoint_root
    assert list_checkpoints(root) == [] and not list(root.glob("step-*"))
