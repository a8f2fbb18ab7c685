"""model.checkpointing=auto in the trainer: the first iteration's measured blocks and resident set against
train.memory_budget_gb decide the plan, logged once; the config keys and their errors."""
import pytest

from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train import checkpoint as ckpt
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.memory import resident_bytes

GIB = 2**30


def trained_plan(tmp_path, budget_gb, steps=2):
    tr = tiny_trainer(tmp_path, "model.checkpointing=auto", f"train.memory_budget_gb={budget_gb!r}",
                      f"train.steps={steps}")
    assert tr.model.checkpointing.measuring
    tr.train()
    return tr, tr.model.checkpointing


def test_budget_decides_how_many_blocks_are_checkpointed(tmp_path, capsys):
    tr, generous = trained_plan(tmp_path / "generous", 1000.0)
    assert generous.checkpointed == frozenset() and len(generous.blocks) == 4    # tiny-cpu: 1 + 1 refiners, 2 layers
    assert "model.checkpointing=auto: 0 of 4 blocks checkpointed" in capsys.readouterr().out
    # A budget that fits exactly one block unchecked, from what the first run measured (the same model and data,
    # so the same sizes): the second run keeps the smallest block and checkpoints the other three.
    blocks = generous.blocks
    by_size = sorted(blocks, key=lambda i: (blocks[i].saved, i))
    need = (resident_bytes(tr.roles, tr.optimizer) + sum(b.inputs for b in blocks.values())
            + blocks[by_size[0]].saved + max(blocks[i].saved for i in by_size[1:]))
    _, one = trained_plan(tmp_path / "one", need / GIB)
    assert one.blocks == blocks and one.checkpointed == frozenset(by_size[1:]) and one.need <= one.budget
    out = capsys.readouterr().out
    assert out.count("3 of 4 blocks checkpointed") == 1 and "does not fit" not in out


def test_a_budget_too_small_checkpoints_every_block_and_says_so(tmp_path, capsys):
    tr, plan = trained_plan(tmp_path, 1e-6)
    assert plan.checkpointed == frozenset(range(4)) and plan.need > plan.budget and tr.step == 2   # trained on
    out = capsys.readouterr().out
    assert out.count("4 of 4 blocks checkpointed") == 1 and "even full checkpointing does not fit" in out


def test_config_keys_and_errors(tmp_path):
    assert load_config("tiny-cpu").model.checkpointing == "none"
    assert load_config("zimage-turbo-lora").model.checkpointing == "full"
    with pytest.raises(ConfigError, match="needs a budget"):
        tiny_trainer(tmp_path, "model.checkpointing=auto", "train.device=cpu")
    with pytest.raises(ConfigError, match="train.memory_budget_gb: must be > 0"):
        load_config("tiny-cpu", ["train.memory_budget_gb=0"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny-cpu", ["model.checkpointing=true"])
    with pytest.raises(ConfigError, match="'model.gradient_checkpointing' was replaced by model.checkpointing"):
        load_config("tiny-cpu", ["model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="model.checkpointing: auto sizes its plan"):
        load_config("tiny-cpu", ["model.checkpointing=auto", "train.memory_budget_gb=8", "deepspeed.stage=2"])


def test_a_checkpoint_with_the_old_key_resumes(tmp_path):
    cfg = load_config("tiny-cpu", ["model.checkpointing=full"])
    saved = cfg.to_dict()
    del saved["model"]["checkpointing"], saved["train"]["memory_budget_gb"]
    saved["model"]["gradient_checkpointing"] = True          # written before model.checkpointing existed
    assert ckpt.resume_changes(tmp_path, saved, cfg) == ['model.checkpointing: "none" -> "full"']


def test_the_plan_holds_the_anchor_roll_out_when_it_is_the_larger(capsys):
    """The anchor's roll-out runs after the batch's (each backward frees its graph): the plan's activations are
    those of the larger of the two, 3 anchor captions on a batch of 1 as a batch of 3, and its header says so."""
    from dopsd_fast.cli import main
    from dopsd_fast.models.z_image import ZImageConfig
    from dopsd_fast.train.memory import student_activations

    anchor = ["method.anchor_per_iteration=3", "method.anchor_prompts=[a red circle]"]
    arch = ZImageConfig.from_dict(load_config("tiny-cpu").model.arch)
    batch3 = student_activations(load_config("tiny-cpu", ["train.batch_size=3"]), arch)
    assert student_activations(load_config("tiny-cpu", anchor), arch) == batch3
    assert student_activations(load_config("tiny-cpu"), arch) < batch3
    assert main(["train", "tiny-cpu", "--dry-run", "--set", anchor[0], "--set", anchor[1]]) == 0
    assert "3 anchor captions per iteration" in capsys.readouterr().out
