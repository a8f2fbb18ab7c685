"""Continual tuning: `dopsd continual PLAN.yaml`, an ordered list of stages trained one after another.

A plan (YAML) names a base config (preset or path), an output folder and the stages; each stage's config is the base,
then the plan's ``set``, then the stage's own ``set`` (dotted keys, as ``--set``). Stage ``i`` trains in
``<output_dir>/NN-<name>`` and starts from stage ``i - 1`` by its transition ``between``:

  merge   the previous student's LoRA is folded into the base weights (``model.merge_loras`` gains its file) and the
          stage trains a fresh adapter (B = 0: no effect at the start)
  keep    the previous student's adapter continues (``adapter.init_from``: same weights, student and EMA teacher)

Both restart AdamW and the EMA teacher from the new student. Merged bases cost nothing on disk: a stage rebuilds
its base from the original weights and the earlier stages' LoRA files, the same way every time (bit for bit, so
resume stays exact). Every stage writes its diffusers LoRA (``<stage>/pytorch_lora_weights.safetensors``: under
merge, the update on top of the earlier stages' merged LoRAs, so the stages' files stack) and, with
``export_merged: true``, the whole transformer after the stage (``<stage>/merged/``, diffusers layout).

After each stage the evaluator scores the student on every earlier stage's prompts, its own and the plan's ordinary
prompts (retention.py), and ``retention.md`` / ``retention.json`` in the output folder grow by one row.

Resume: a killed plan reruns with the same command. A stage in progress resumes from its own checkpoints (the
trainer's exact resume); ``plan_state.json``, rewritten atomically when a stage is finished (trained, exported,
evaluated), lists the finished stages, their configs and results, which a rerun skips. ``run_plan`` takes an
evaluator and per-stage hooks, so a program (the miniature world's sequential demo) can run a plan with its own
measurements.
"""
from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..models.adapter import model_family
from ..models.export import LORA_FILE, save_full_weights
from . import checkpoint as ckpt
from .build import check_buildable, resolve_plan, resolve_weights
from .config import Config, ConfigError, _yaml_problem, load_config
from .retention import PixelRetention, write_table
from .run_dir import lock_output_dir

STATE_FILE = "plan_state.json"
PLAN_KEYS = {"base", "output_dir", "between", "export_merged", "set", "evaluation", "stages"}
STAGE_KEYS = {"name", "between", "set", "prompts"}
EVAL_KEYS = {"prompts", "few_steps", "many_steps", "seed"}
REQUIRED = {"base": "names the config every stage starts from (a preset, e.g. tiny-cpu, or a YAML path)",
            "output_dir": "names the plan's folder (stages train in subfolders)",
            "stages": "lists at least one stage ({name: ..., set: {...}})"}
OWNED = ("train.output_dir", "train.resume")            # the plan sets these for every stage
START_KEYS = ("adapter.init_from", "model.merge_loras")  # where the plan starts: its own `set` only, not a stage's
# model keys that may differ between stages (how it runs, or merge_loras, which the plan sets)
MODEL_FREE = {"checkpointing", "ops_backend", "compile", "merge_loras"}


@dataclass
class Stage:
    index: int
    name: str
    dir: Path
    between: str | None                 # None for the first stage
    cfg: Config
    prompts: list[str] | None           # evaluation prompts; None: the first 4 captions of its data


@dataclass
class ContinualPlan:
    path: str                           # the plan file (or what a program named its plan)
    output_dir: Path
    stages: list[Stage]
    ordinary: list[str]                 # prompts with no concept, evaluated from the start row on
    few_steps: int | None
    many_steps: int
    seed: int
    export_merged: bool

    @property
    def state_path(self) -> Path:
        return self.output_dir / STATE_FILE


@dataclass
class Hooks:
    """Called by ``run_plan`` for stages that run (not for finished ones it skips)."""
    on_stage_start: Callable[[Stage, Any], None] | None = None          # (stage, trainer) before it trains/resumes
    on_stage_end: Callable[[Stage, Any, dict], None] | None = None      # (stage, trainer, record) once recorded


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _keys(where: str, data: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(data, dict):
        raise _fail(where, f"expected a mapping of {what} keys ({', '.join(sorted(allowed))}), got {data!r}")
    for k in data:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            raise _fail(where, f"unknown {what} key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                        + f"; valid keys: {', '.join(sorted(allowed))}")
    return data


def _sets(where: str, data: Any, forbidden: tuple[str, ...]) -> list[str]:
    """A `set:` mapping of dotted keys -> values as --set strings (JSON is YAML, so values keep their types)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise _fail(where, f"expected a mapping of dotted config keys to values (train.steps: 100), got {data!r}")
    for k in data:
        if k in forbidden:
            raise _fail(f"{where}.{k}", "is set by the plan" + (" (each stage's folder, resume auto)" if k in OWNED
                        else "'s transitions; set where the plan starts in the plan's own `set`"))
    return [f"{k}={json.dumps(v)}" for k, v in data.items()]


def _prompts(where: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise _fail(where, f"expected a list of non-empty prompt strings, got {value!r}")
    return value


def load_plan(path: str | Path) -> ContinualPlan:
    """The plan in YAML file ``path`` (``parse_plan``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file; pass a continual plan YAML (see examples/)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}); fix the syntax there") from None
    return parse_plan(data, str(path))


def parse_plan(data: Any, where: str) -> ContinualPlan:
    """Validate a plan (the YAML's mapping; a program may build one) and build every stage's config (no weights),
    so a bad key anywhere fails here, naming ``where`` (the plan file), the stage and the key."""
    plan = _keys(where, data, PLAN_KEYS, "plan")
    for key in ("base", "output_dir", "stages"):
        if plan.get(key) in (None, "", []):
            raise _fail(f"{where}: {key}", REQUIRED[key])
    if not isinstance(plan["stages"], list):
        raise _fail(f"{where}: stages", "expected a list of stages")
    default = plan.get("between", "merge")
    if default not in ("merge", "keep"):
        raise _fail(f"{where}: between", f"{default!r} is not one of 'merge', 'keep'")
    ev = _keys(f"{where}: evaluation", plan.get("evaluation") or {}, EVAL_KEYS, "evaluation")
    for key, low in (("few_steps", 1), ("many_steps", 1), ("seed", 0)):
        v = ev.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise _fail(f"{where}: evaluation.{key}", f"expected an integer >= {low}, got {v!r}")
    if not isinstance(plan.get("export_merged", False), bool):
        raise _fail(f"{where}: export_merged", "expected true or false")
    out = Path(plan["output_dir"])
    common = _sets(f"{where}: set", plan.get("set"), OWNED)
    stages: list[Stage] = []
    for i, raw in enumerate(plan["stages"]):
        stages.append(_stage(f"{where}: stages[{i}]", raw, stages, plan["base"], default, common, out))
    return ContinualPlan(where, out, stages, _prompts(f"{where}: evaluation.prompts", ev.get("prompts")) or [],
                         ev.get("few_steps"), ev.get("many_steps", 32), ev.get("seed", 0),
                         plan.get("export_merged", False))


def _stage(where: str, raw: Any, earlier: list[Stage], base: str, default: str, common: list[str],
           out: Path) -> Stage:
    """Stage ``len(earlier)``: its config is ``base`` + the plan's ``common`` sets + its own + what the plan owns."""
    i = len(earlier)
    raw = _keys(where, raw, STAGE_KEYS, "stage")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _fail(f"{where}.name", f"expected a folder-safe name (letters, digits, _ . -), got {name!r}")
    if name in ("start", "ordinary"):
        raise _fail(f"{where}.name", f"{name!r} names a row or set of the retention table; pick another")
    if any(s.name == name for s in earlier):
        raise _fail(f"{where}.name", f"{name!r} is used twice; stage names are unique")
    where = f"{where} ({name})"
    between = raw.get("between", default if i else None)
    if i == 0 and "between" in raw:
        raise _fail(f"{where}.between", "the first stage has no previous stage to merge or keep")
    if between not in (None, "merge", "keep"):
        raise _fail(f"{where}.between", f"{between!r} is not one of 'merge', 'keep'")
    stage_dir = out / f"{i + 1:02d}-{name}"
    sets = common + _sets(f"{where}.set", raw.get("set"), OWNED + START_KEYS) + \
        [f"train.output_dir={json.dumps(str(stage_dir))}", "train.resume=auto"]
    if earlier:
        sets += _transition(earlier[-1], between)
    try:
        cfg = load_config(base, sets)
    except ConfigError as err:
        raise _fail(where, str(err)) from None
    stage = Stage(i, name, stage_dir, between, cfg, _prompts(f"{where}.prompts", raw.get("prompts")))
    _check_stage(stage, earlier[0] if earlier else None, earlier[-1] if earlier else None, where)
    return stage


def _transition(prev: Stage, between: str) -> list[str]:
    """The keys that start a stage from ``prev``: its LoRA merged into the base, or continued."""
    lora = str(prev.dir / LORA_FILE)
    if between == "merge":
        return [f"model.merge_loras={json.dumps(prev.cfg.model.merge_loras + [lora])}", "adapter.init_from=null"]
    return [f"model.merge_loras={json.dumps(prev.cfg.model.merge_loras)}", f"adapter.init_from={json.dumps(lora)}"]


def _check_stage(stage: Stage, first: Stage | None, prev: Stage | None, where: str) -> None:
    cfg = stage.cfg
    if cfg.adapter.mode != "lora":
        raise _fail(f"{where}: adapter.mode", "continual plans train LoRA adapters (merge and keep act on them); "
                                              "set adapter.mode=lora")
    if cfg.deepspeed.stage is not None:
        raise _fail(f"{where}: deepspeed.stage", "continual plans run in one process for now; set it to null")
    if not cfg.data.encode_missing:
        raise _fail(f"{where}: data.encode_missing", "false never loads the text encoder, but each stage samples "
                                                     "prompts of other stages that no cache holds; set it to true (a "
                                                     "miss then loads the encoder once)")
    if first is not None:
        fixed = {k: v for k, v in dataclasses.asdict(first.cfg.model).items() if k not in MODEL_FREE}
        for k, v in dataclasses.asdict(cfg.model).items():
            if k in fixed and v != fixed[k]:
                raise _fail(f"{where}: model.{k}", f"{v!r} differs from the first stage's {fixed[k]!r}; every stage "
                                                   "tunes the same base model (set model keys in the plan's `set`)")
    if prev is not None and stage.between == "keep":
        for k in ("rank", "alpha", "targets"):
            if getattr(cfg.adapter, k) != getattr(prev.cfg.adapter, k):
                raise _fail(f"{where}: adapter.{k}", f"between: keep continues {prev.name}'s adapter, whose {k} "
                                                     f"is {getattr(prev.cfg.adapter, k)!r}; keep it, or use between: "
                                                     "merge")


def describe(plan: ContinualPlan) -> dict[str, Any]:
    """What `dopsd continual --dry-run` prints; resolves every stage's architecture and adapter (no weights)."""
    stages = []
    for s in plan.stages:
        cfg = resolve_weights(s.cfg, download=False)
        try:
            p = resolve_plan(cfg, need_weights=False)
        except ConfigError as err:
            raise _fail(f"{plan.path}: stages[{s.index}] ({s.name})", str(err)) from None
        start = {None: "the base model" + (f" + {s.cfg.adapter.init_from}" if s.cfg.adapter.init_from else ""),
                 "merge": f"{plan.stages[s.index - 1].name}'s LoRA merged into the base; a fresh adapter",
                 "keep": f"{plan.stages[s.index - 1].name}'s adapter, continued"}[s.between]
        earlier = [t.name for t in plan.stages[:s.index + 1]]
        stages.append({"name": s.name, "dir": str(s.dir), "starts_from": start,
                       "model.merge_loras": s.cfg.model.merge_loras, "adapter.init_from": s.cfg.adapter.init_from,
                       "objective": s.cfg.method.objective, "steps": s.cfg.train.steps,
                       "data": dataclasses.asdict(s.cfg.data),
                       "trainable_parameters": p.trainable_params,
                       "prompts": s.prompts or "the first 4 captions of its data",
                       "evaluates": earlier + (["ordinary"] if plan.ordinary else []),
                       "exports": [str(s.dir / LORA_FILE)] + ([str(s.dir / "merged")] if plan.export_merged else [])})
    return {"plan": plan.path, "output_dir": str(plan.output_dir), "stages": stages,
            "evaluation": {"ordinary": plan.ordinary, "few_steps": plan.few_steps or "the family's few-step sampler",
                           "many_steps": plan.many_steps, "seed": plan.seed},
            "tables": [str(plan.output_dir / "retention.md"), str(plan.output_dir / "retention.json")]}


def buildable(plan: ContinualPlan) -> str | None:
    """Why this version cannot train some stage yet (weights not downloaded, ...), or None."""
    for s in plan.stages:
        try:
            check_buildable(resolve_weights(s.cfg, download=False))
        except ConfigError as err:
            return f"stage {s.name}: {err}"
    return None


# ---------------------------------------------------------------- running

def _evaluation(plan: ContinualPlan) -> dict[str, Any]:
    return {"ordinary": plan.ordinary, "few_steps": plan.few_steps, "many_steps": plan.many_steps, "seed": plan.seed}


def _read_state(plan: ContinualPlan) -> dict[str, Any]:
    if not plan.state_path.is_file():
        return {"evaluation": _evaluation(plan), "start": None, "stages": []}
    try:
        state = json.loads(plan.state_path.read_text())
        names = [e["name"] for e in state["stages"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ckpt.CheckpointError(f"{plan.state_path}: unreadable ({err}); it is written atomically, so it was "
                                   "edited: restore it or give the plan a new output_dir") from None
    if state.get("evaluation") != _evaluation(plan):      # earlier rows were scored on the recorded settings
        raise ConfigError(f"{plan.state_path}: the plan's evaluation changed since its first rows were scored "
                          f"({state.get('evaluation')} -> {_evaluation(plan)}); restore it or give the plan a new "
                          "output_dir")
    planned = [s.name for s in plan.stages]
    if names != planned[:len(names)]:
        raise ConfigError(f"{plan.state_path}: stages {names} are finished, but the plan now lists {planned}; finished "
                          "stages cannot change: give the plan a new output_dir")
    for entry, stage in zip(state["stages"], plan.stages):
        try:
            ckpt.resume_changes(plan.state_path, entry["config"], stage.cfg)
        except ckpt.CheckpointError as err:
            raise ConfigError(f"stage {stage.name} is finished with another config: {err}") from None
        if stage.prompts is not None and stage.prompts != entry["prompts"]:
            raise ConfigError(f"stage {stage.name} is finished, evaluated on {entry['prompts']}; the plan now gives "
                              f"{stage.prompts}: restore them or give the plan a new output_dir")
        if entry["config"]["train"]["steps"] != stage.cfg.train.steps:
            raise ConfigError(f"stage {stage.name} is finished at {entry['config']['train']['steps']} steps, the plan "
                              f"now asks {stage.cfg.train.steps}; give the plan a new output_dir")
    return state


def _write_state(plan: ContinualPlan, state: dict[str, Any]) -> None:
    tmp = plan.state_path.with_name(STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, plan.state_path)        # a kill leaves the old state or the new one, never half of one


def run_plan(plan: ContinualPlan, evaluator: Callable | None = None, hooks: Hooks | None = None,
             progress: bool = True, make_trainer: Callable | None = None) -> dict[str, Any]:
    """Run (or resume) every unfinished stage; returns the plan state (stages with their LoRA, merged weights,
    prompts and scores). ``evaluator``: see retention.py (default PixelRetention with the plan's settings);
    ``make_trainer(cfg, progress)``: builds a stage's trainer (default trainer.make_trainer; the world's sequential
    demo passes its anchored trainers)."""
    if make_trainer is None:
        from .trainer import make_trainer

    evaluator = evaluator or PixelRetention(plan.few_steps, plan.many_steps, plan.seed)
    hooks = hooks or Hooks()
    ckpt.check_writable(plan.output_dir)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    with lock_output_dir(plan.output_dir):
        state = _read_state(plan)
        for stage in plan.stages[len(state["stages"]):]:
            trainer = make_trainer(stage.cfg, progress=progress)
            if hooks.on_stage_start:
                hooks.on_stage_start(stage, trainer)
            if stage.index == 0 and state["start"] is None and plan.ordinary:
                # before train(), which loads any checkpoint: the student as the plan starts
                out = plan.output_dir / "00-start"
                scores = evaluator("start", trainer, {"ordinary": plan.ordinary}, {"ordinary": out}, out)
                state["start"] = {"dir": str(out), "scores": scores}
                _write_state(plan, state)
            trainer.train()
            record = _finish(plan, stage, trainer, state, evaluator)
            state["stages"].append(record)
            _write_state(plan, state)
            write_table(plan.output_dir, _rows(state), _note(plan, evaluator))
            if hooks.on_stage_end:
                hooks.on_stage_end(stage, trainer, record)
            del trainer             # a real model's weights go before the next stage loads its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return state


def _finish(plan: ContinualPlan, stage: Stage, trainer, state: dict[str, Any], evaluator) -> dict[str, Any]:
    """Export and evaluate a trained stage (all of it idempotent: a kill here reruns it)."""
    final = trainer.checkpoint_root / f"step-{trainer.step:06d}"
    lora = ckpt.publish_files(final, stage.dir, [LORA_FILE])[0]     # a kill may have come before the trainer's own
    merged = None
    if plan.export_merged:
        merged, tmp = stage.dir / "merged", stage.dir / "merged.tmp"
        save_full_weights(trainer.roles.student_model, tmp, "student")
        if merged.exists():
            shutil.rmtree(merged)
        os.replace(tmp, merged)
    prompts = stage.prompts or trainer.grid_pairs()[1]
    done = state["stages"]
    sets = {**{e["name"]: e["prompts"] for e in done}, stage.name: prompts}
    refs = {**{e["name"]: Path(e["dir"]) / "retention" for e in done}, stage.name: stage.dir / "retention"}
    if plan.ordinary:
        sets["ordinary"] = plan.ordinary
        refs["ordinary"] = Path(state["start"]["dir"])
    scores = evaluator(stage.name, trainer, sets, refs, stage.dir / "retention")
    return {"name": stage.name, "dir": str(stage.dir), "between": stage.between, "lora": str(lora),
            "merged": str(merged) if merged else None, "prompts": prompts, "scores": scores,
            "config": stage.cfg.to_dict()}


def _rows(state: dict[str, Any]) -> list[tuple[str, dict]]:
    start = [("start", state["start"]["scores"])] if state["start"] else []
    return start + [(e["name"], e["scores"]) for e in state["stages"]]


def _note(plan: ContinualPlan, evaluator) -> str:
    if isinstance(evaluator, PixelRetention):
        return (f"Retention after each stage ({plan.path}): mean absolute difference of 32x32 area-averaged samples in "
                f"[0, 1]; drift vs the sample when the set was taught (ordinary: at the start), few = "
                f"{plan.few_steps or model_family(plan.stages[0].cfg.model.family).inference_steps} steps, many = "
                f"{plan.many_steps} (dopsd_fast/train/retention.py).")
    return f"Retention after each stage ({plan.path}), scored by {type(evaluator).__name__}."
