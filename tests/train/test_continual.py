"""Continual plans (train/continual.py) on the tiny presets: stage transitions, exact resume across stages and
within one, retention outputs, the dry run, bad plans and the real-model example."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from dopsd_fast.cli import main
from dopsd_fast.models.export import LORA_FILE, merged_state_dict
from dopsd_fast.nn.lora_linear import LoRALinear
from dopsd_fast.train.checkpoint import load_tensors
from dopsd_fast.train.continual import Hooks, load_plan, run_plan
from dopsd_fast.train.retention import PixelRetention
from dopsd_fast.train.run_parts import load_run

ROOT = Path(__file__).resolve().parents[2]


class Killed(Exception):
    """Stands for a kill at a chosen point: the plan's process ends there, files as they are."""


def write_plan(tmp_path: Path, base="tiny-cpu", between="merge", stages=None, **extra) -> Path:
    plan = {"base": base, "output_dir": str(tmp_path / "plan"), "between": between,
            "set": {"train.steps": 3, "train.checkpoint_every": 2, "train.log_every": 100},
            "evaluation": {"prompts": ["a red circle"], "many_steps": 4},
            "stages": stages or [{"name": "one", "set": {"data.seed": 1}, "prompts": ["a blue square"]},
                                 {"name": "two", "set": {"data.seed": 2}, "prompts": ["a green triangle"]}],
            **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def base_weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def student(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.roles.trainable.items()}


def assert_teacher_is_student(trainer):
    for t, s in zip(trainer.roles.ema.teacher, trainer.roles.trainable.values()):
        assert torch.equal(t, s)


@pytest.mark.parametrize("base", ["tiny-cpu", "tiny-klein-cpu"])
def test_merge_transition_folds_the_lora_and_starts_fresh(tmp_path, base):
    seen = {}

    def end(stage, trainer, record):
        if stage.index == 0:
            seen["merged"] = merged_state_dict(trainer.model, "student")   # what `dopsd export --format full` writes
            seen["base"] = {k: v for k, v in base_weights(trainer.model).items()}

    def start(stage, trainer):
        if stage.index == 1:
            seen["next_base"] = base_weights(trainer.model)
            seen["fresh"] = student(trainer)
            assert_teacher_is_student(trainer)
            m = next(m for m in trainer.model.modules() if isinstance(m, LoRALinear))
            x = torch.randn(5, m.in_features)
            m.active_adapter = "student"
            assert torch.equal(m(x), torch.nn.functional.linear(x, m.weight, m.bias))   # zero effect at the start

    state = run_plan(load_plan(write_plan(tmp_path, base)), hooks=Hooks(start, end), progress=False)
    assert [e["between"] for e in state["stages"]] == [None, "merge"]
    changed = [k for k in seen["base"] if not torch.equal(seen["base"][k], seen["merged"][k])]
    assert changed, "stage one trained no LoRA update to merge"
    assert seen["next_base"].keys() == seen["merged"].keys()
    assert all(torch.equal(seen["next_base"][k], seen["merged"][k]) for k in seen["merged"])   # bit for bit
    assert all(not v.any() for k, v in seen["fresh"].items() if ".lora_B." in k)
    assert all(v.any() for k, v in seen["fresh"].items() if ".lora_A." in k)
    # the retention table: a start row (ordinary prompts) and one row per stage, each earlier concept evaluated
    table = json.loads((tmp_path / "plan" / "retention.json").read_text())
    assert table["rows"] == ["start", "one", "two"] and table["sets"] == ["ordinary", "one", "two"]
    assert set(table["scores"]["two"]) == {"one", "two", "ordinary"}
    assert set(table["scores"]["one"]) == {"one", "ordinary"}
    assert table["scores"]["one"]["one"]["drift_few"] == 0.0          # its own reference
    assert "| two |" in (tmp_path / "plan" / "retention.md").read_text()
    assert (tmp_path / "plan" / "02-two" / "retention" / "grid.png").is_file()


def test_keep_transition_continues_the_adapter(tmp_path):
    seen = {}

    def end(stage, trainer, record):
        if stage.index == 0:
            seen["student"], seen["base"] = student(trainer), base_weights(trainer.model)

    def start(stage, trainer):
        if stage.index == 1:
            seen["next"], seen["next_base"] = student(trainer), base_weights(trainer.model)
            assert_teacher_is_student(trainer)

    run_plan(load_plan(write_plan(tmp_path, between="keep")), hooks=Hooks(start, end), progress=False)
    assert seen["next"].keys() == seen["student"].keys()
    assert all(torch.equal(seen["next"][k], seen["student"][k]) for k in seen["student"])
    assert any(seen["student"][k].any() for k in seen["student"] if ".lora_B." in k)
    assert all(torch.equal(seen["next_base"][k], seen["base"][k]) for k in seen["base"])   # nothing merged


def test_killed_plan_resumes_to_the_same_weights(tmp_path):
    """Kills in the first stage's evaluation, between the stages and mid-way through the second stage (between
    its checkpoints), each followed by a rerun, end where an uninterrupted plan ends; with the self-distillation
    anchor on, as README advises for continual runs."""
    anchored = {"train.steps": 3, "train.checkpoint_every": 2, "train.log_every": 100,
                "method.anchor_per_iteration": 1, "method.anchor_prompts": ["a red circle", "a yellow cross"]}
    straight = run_plan(load_plan(write_plan(tmp_path / "a", export_merged=True, set=anchored)), progress=False)

    plan = load_plan(write_plan(tmp_path / "b", export_merged=True, set=anchored))

    def failing_eval(row, trainer, sets, refs, out):
        if row == "one":
            raise Killed
        return PixelRetention(plan.few_steps, plan.many_steps, plan.seed)(row, trainer, sets, refs, out)
    with pytest.raises(Killed):        # after stage one trained and exported, before it is recorded
        run_plan(plan, evaluator=failing_eval, progress=False)
    state = json.loads(plan.state_path.read_text())
    assert state["stages"] == [] and state["start"] is not None

    def between(stage, trainer, record):
        raise Killed
    with pytest.raises(Killed):        # stage one recorded, stage two not begun
        run_plan(plan, hooks=Hooks(on_stage_end=between), progress=False)
    assert [e["name"] for e in json.loads(plan.state_path.read_text())["stages"]] == ["one"]

    def mid(stage, trainer):
        step = trainer.optimizer_step

        def killing(loss=0.0):
            if trainer.step == 2:          # the 3rd step: after the checkpoint at 2
                raise Killed
            return step(loss)
        trainer.optimizer_step = killing
    started = []
    with pytest.raises(Killed):        # stage one is skipped: plan_state.json lists it finished
        run_plan(plan, hooks=Hooks(on_stage_start=lambda s, t: (started.append(s.name), mid(s, t))), progress=False)

    def resumes_at_2(stage, trainer):
        started.append(stage.name)
        assert trainer.resume_point().name == "step-000002"
    resumed = run_plan(plan, hooks=Hooks(on_stage_start=resumes_at_2), progress=False)
    assert started == ["two", "two"]

    for a, b in zip(straight["stages"], resumed["stages"]):
        assert a["scores"] == b["scores"]
        for name in (a["lora"], str(Path(a["merged"]) / "diffusion_pytorch_model.safetensors")):
            x, y = load_tensors(Path(name)), load_tensors(Path(name.replace(str(tmp_path / "a"), str(tmp_path / "b"))))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # `dopsd export` / `sample` rebuild a stage's model from the original base and the merged LoRAs
    run = load_run(tmp_path / "b" / "plan" / "02-two")
    merged = load_tensors(tmp_path / "b" / "plan" / "02-two" / "merged" / "diffusion_pytorch_model.safetensors")
    rebuilt = merged_state_dict(run.model, "student")
    assert all(torch.equal(rebuilt[k], merged[k]) for k in merged)


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path, capsys):
    plan = write_plan(tmp_path, stages=[{"name": "one"}, {"name": "two", "between": "keep"}, {"name": "three"}])
    assert main(["continual", str(plan), "--dry-run"]) == 0
    out = yaml.safe_load(capsys.readouterr().out.split("plan OK")[0])["continual"]
    assert [s["name"] for s in out["stages"]] == ["one", "two", "three"]
    assert [s["starts_from"] for s in out["stages"]] == [
        "the base model", "one's adapter, continued", "two's LoRA merged into the base; a fresh adapter"]
    lora = lambda s: str(tmp_path / "plan" / s / LORA_FILE)     # noqa: E731
    assert out["stages"][1]["adapter.init_from"] == lora("01-one")
    assert out["stages"][2]["model.merge_loras"] == [lora("02-two")] and out["stages"][2]["adapter.init_from"] is None
    assert out["stages"][2]["evaluates"] == ["one", "two", "three", "ordinary"]
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("change, message", [
    ({"extra_key": 1}, "unknown plan key 'extra_key'"),
    ({"stages": [{"name": "one", "set": {"train.stpes": 3}}]}, "stages[0] (one): unknown config key 'train.stpes'"),
    ({"stages": [{"name": "one", "set": {"train.output_dir": "x"}}]},
     "stages[0] (one).set.train.output_dir: is set by the plan"),
    ({"stages": [{"name": "one"}, {"name": "two", "set": {"adapter.init_from": "x"}}]},
     "set.adapter.init_from: is set by the plan"),
    ({"stages": [{"name": "one", "between": "keep"}]}, "the first stage has no previous stage"),
    ({"stages": [{"name": "one"}, {"name": "one"}]}, "'one' is used twice"),
    ({"stages": [{"name": "one"}, {"name": "two", "set": {"adapter.rank": 4}}], "between": "keep"},
     "stages[1] (two): adapter.rank: between: keep continues one's adapter"),
    ({"stages": [{"name": "one"}, {"name": "two", "set": {"model.init_seed": 1}}]}, "model.init_seed: 1 differs"),
    ({"set": {"adapter.mode": "full"}}, "continual plans train LoRA adapters"),
    ({"between": "fold"}, "between: 'fold' is not one of"),
    ({"set": {"data.encode_missing": False}}, "data.encode_missing: false never loads the text encoder"),
    ({"stages": []}, "stages: lists at least one stage"),
])
def test_bad_plans_exit_2_naming_the_key(tmp_path, capsys, change, message):
    plan = write_plan(tmp_path, **{k: v for k, v in change.items() if k not in ("stages",)},
                      stages=change.get("stages"))
    if change.get("stages") == []:          # write_plan's default would fill it in
        data = yaml.safe_load(plan.read_text())
        plan.write_text(yaml.safe_dump({**data, "stages": []}))
    assert main(["continual", str(plan), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(plan) in err and message in err, err


def test_a_finished_stage_cannot_change(tmp_path, capsys):
    path = write_plan(tmp_path, stages=[{"name": "one", "set": {"data.seed": 1}}])
    run_plan(load_plan(path), progress=False)
    text = path.read_text()
    for change, message in (
            (("train.steps: 3", "train.steps: 4"), "stage one is finished at 3 steps, the plan now asks 4"),
            (("many_steps: 4", "many_steps: 5"), "the plan's evaluation changed"),
            (("data.seed: 1", "data.seed: 2"), "stage one is finished with another config"),
            (("name: one", "name: uno"), "stages ['one'] are finished, but the plan now lists ['uno']")):
        path.write_text(text.replace(*change))
        assert main(["continual", str(path), "--no-progress"]) == 2
        assert message in capsys.readouterr().err


def test_real_model_example_plan_validates(capsys):
    assert main(["continual", str(ROOT / "examples" / "continual-zimage.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable_parameters: 158760960" in out and "merged into the base" in out


def test_a_missing_merged_lora_names_the_key_and_the_file(tmp_path, capsys):
    missing = tmp_path / "gone.safetensors"
    code = main(["train", "tiny-cpu", "--set", f"train.output_dir={tmp_path / 'run'}", "--set",
                 f"model.merge_loras=[{missing}]", "--no-progress", "--no-samples"])
    err = capsys.readouterr().err
    assert code == 2 and "model.merge_loras:" in err and str(missing) in err, err
    assert not (tmp_path / "run").exists()
