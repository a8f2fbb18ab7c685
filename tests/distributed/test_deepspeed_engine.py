"""The DeepSpeed engine path in one process (a world of one, gloo): K + 1 micro-backwards through engine.backward
and one engine.step() give what one backward of the mean loss gives in the plain trainer, on ZeRO 1, 2 and 3."""
import json
import sys

import pytest

pytest.importorskip("deepspeed")

import deepspeed.comm  # noqa: E402,F401  (registers deepspeed.comm.torch)

# gloo does the collectives; skip the CPU shm op DeepSpeed would JIT-build first (~25 s, more on a busy machine)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

from dopsd_fast.ops._dispatch import use_backend  # noqa: E402
from dopsd_fast.testing import tiny_trainer  # noqa: E402
from dopsd_fast.train.checkpoint import CheckpointError  # noqa: E402
from dopsd_fast.train.config import ConfigError, load_config  # noqa: E402
from dopsd_fast.train.distributed import destroy_process_group  # noqa: E402

COMMON = ["train.steps=3", "train.batch_size=2", "optim.warmup_steps=2", "train.checkpoint_every=100",
          "train.tensorboard=false"]


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


def test_zero3_full_fine_tuning_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="deepspeed.stage: 3 trains LoRA adapters"):
        load_config("tiny-cpu", ["deepspeed.stage=3", "adapter.mode=full"])


def test_zero3_checkpoint_does_not_resume_on_zero2(tmp_path):
    """The stage is checked before DeepSpeed reads its shards (it fails on ZeRO-3 shards with a bare assert)."""
    step = tmp_path / "step-000001"
    step.mkdir()
    zero3 = load_config("tiny-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", "deepspeed.stage=3", *COMMON])
    (step / "state.json").write_text(json.dumps({"step": 1, "data": {}, "world_size": 1, "config": zero3.to_dict()}))
    trainer = tiny_trainer(tmp_path, "deepspeed.stage=2", *COMMON)
    with pytest.raises(CheckpointError, match="another experiment \\(deepspeed.stage: 3 -> 2\\)"):
        trainer.load(step)
