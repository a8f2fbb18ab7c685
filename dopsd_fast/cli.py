"""`dopsd train CONFIG [--set k=v ...] [--dry-run]`, `dopsd sample RUN_DIR`, `dopsd continual PLAN` and `dopsd demo`."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import NoReturn

import yaml

from ._extras import MissingExtra
from .data.folder import DataError
from .models.loading import WeightsError
from .progress import quiet
from .sample import save_grid
from .train.build import check_buildable, resolve_plan, resolve_weights
from .train.checkpoint import CheckpointError, check_writable, describe_os_error
from .train.config import ConfigError, load_config
from .train.distributed import destroy_process_group, end_process, launched_world_size, rank
from .train.finite import EXIT_DIVERGED, TrainingDiverged
from .train.memory import format_memory_plan, memory_plan
from .train.run_dir import OutputDirBusy
from .train.stop import EXIT_STOPPED, TrainingStopped
from .train.run_parts import load_run
from .train.trainer import make_trainer


# Why a random-init run's pictures (tiny-cpu's) show no shapes: printed where they are written.
RANDOM_INIT_NOTE = ("these tiles are noise by design: model.pretrained is null, so the model started from random weights "
                    "and trained a few hundred steps on a few synthetic pairs; such a run shows the method's mechanics "
                    "(losses, checkpoints, resume), and `dopsd demo` shows a pretrained turbo learning a concept")


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        cfg = resolve_weights(cfg, download=False)      # Hub ids already in the cache; no download
        plan = resolve_plan(cfg, need_weights=False)
        print(yaml.safe_dump({"plan": plan.describe(cfg)}, sort_keys=False, default_flow_style=None), end="")
        world = launched_world_size() if args.world_size is None else args.world_size
        _at_least("--world-size", world, 1)
        try:        # as YAML comments: the output above stays one YAML document
            table = format_memory_plan(memory_plan(cfg, plan.arch, plan.total_params, plan.trainable_params, world),
                                       cfg, world)
        except (RuntimeError, ValueError) as err:      # e.g. world-demo before `dopsd demo` sets its model
            table = f"memory plan: none, the student's forward does not run on this config ({str(err).splitlines()[0]})"
        print(textwrap.indent(table, "# ", lambda line: True))
        try:
            check_buildable(cfg)
            print("config OK: `dopsd train` would build this run")
        except ConfigError as err:
            print(f"config is valid, but this version cannot train it yet: {err}")
        return 0
    check_writable(Path(cfg.train.output_dir))     # a read-only or full disk fails before any weights load
    trainer = make_trainer(cfg, progress=not args.no_progress)
    plan = trainer.plan
    say = print if trainer.is_main else (lambda *a, **k: None)     # one report per run, not one per rank
    say(f"dopsd: {cfg.method.objective} on {cfg.model.family}, {plan.trainable_params:,} trainable of "
          f"{plan.total_params:,} parameters, K={len(cfg.method.sigmas)}, {cfg.train.steps} steps -> {trainer.out}")
    before = None
    # every rank calls the samplers (ZeRO-3 gathers the weights on all of them); rank 0 samples
    if not args.no_samples and trainer.resume_point() is None:
        before = trainer.sample_student(trainer.grid_pairs()[1], trainer.sample_sigmas)
    trainer.train()
    last = trainer.checkpoint_root / f"step-{trainer.step:06d}"
    say(f"checkpoint: {last}")
    if not args.no_samples:
        grid = trainer.sample_grid(trainer.out / "samples.png", before)
        say(f"samples:    {grid}  (rows: data pairs; columns: target | student before | student after, "
            f"{cfg.sample.steps} steps | after, K={len(cfg.method.sigmas)} training steps)")
        if cfg.model.pretrained is None:
            say(f"            {RANDOM_INIT_NOTE}")
    if (trainer.out / "loss.png").is_file():
        say(f"loss curve: {trainer.out / 'loss.png'}  (each roll-out step's loss and their mean, from metrics.jsonl)")
    destroy_process_group()         # a DeepSpeed run's ranks leave their group together (no-op in one process)
    return 0


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{flag}: must be >= {low}, got {value}")


def _sample(args: argparse.Namespace) -> int:
    if args.steps is not None:
        _at_least("--steps", args.steps, 1)
    run = load_run(Path(args.run), args.checkpoint, sampling=True)
    prompts = args.prompt or run.cfg.sample.prompts or run.data_prompts()
    steps = run.cfg.sample.steps if args.steps is None else args.steps
    images = run.sample_student(prompts, run.sampler_sigmas(steps), seed=args.seed)
    out = save_grid([[im] for im in images], Path(args.out), row_labels=prompts,
                    col_labels=[f"student, {steps} steps"])
    print(json.dumps({"prompts": prompts, "steps": steps, "checkpoint": str(run.loaded_from), "grid": str(out)}, indent=1))
    if run.cfg.model.pretrained is None:
        print(RANDOM_INIT_NOTE, file=sys.stderr)
    return 0


DEMO_OUT = "outputs/world-demo"


def _demo(args: argparse.Namespace) -> int:
    from .world.demo import Demo, format_report      # the world needs transformers; import it only here
    continual = args.continual
    iterations = (100 if continual else 200) if args.iterations is None else args.iterations
    prompts = (64 if continual else 128) if args.eval_prompts is None else args.eval_prompts
    anchor = (4 if continual else 0) if args.anchor is None else args.anchor
    for flag, value, low in (("--iterations", iterations, 1), ("--eval-prompts", prompts, 1),
                             ("--multi-steps", args.multi_steps, 1), ("--anchor", anchor, 0)):
        _at_least(flag, value, low)
    out = Path(args.out)
    tic = time.perf_counter()
    try:
        if continual:
            from .world.continual import ContinualDemo, arms_named, write_report
            out = out.with_name(out.name + "-continual") if args.out == DEMO_OUT else out
            arms = arms_named(args.arms)
            text = write_report(out, ContinualDemo(out, iterations, prompts, args.multi_steps, args.seed,
                                                   tuple(args.set), anchor, arms, between=args.between).run())
            print(f"report: {out / 'report.md'} and report.json; per stage grids in {out}/<arm>/<NN-stage>/"
                  f"retention/grid-4steps.png; wall time {time.perf_counter() - tic:.0f} s\n\n{text}")
            return 0
        report = Demo(out, iterations, prompts, args.multi_steps, args.seed, tuple(args.set), anchor=anchor).run()
    except FileNotFoundError as err:       # a source tree without the shipped world weights
        print(f"dopsd: error: {err}", file=sys.stderr)
        return 2
    text = format_report(report)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"grids: {', '.join(report['grids'])} (labelled; rows: turbo before / SFT / D-OPSD; columns: 8 new-concept, "
          f"then 8 original prompts)\nreport: {out / 'report.md'} and report.json; wall time "
          f"{time.perf_counter() - tic:.0f} s\n")
    print(text)         # last, so that the terminal ends with the verdicts
    return 0


def _export(args: argparse.Namespace) -> int:
    from .models.export import COMFYUI_FILE, save_comfyui_lora, save_diffusers_lora, save_full_weights
    from .train.build import DTYPES

    run = load_run(Path(args.run), args.checkpoint)        # the transformer and adapters only: no data, no encoders
    dtype = DTYPES[args.dtype] if args.dtype else None
    out, lora = Path(args.out), run.cfg.adapter.mode == "lora"
    if args.format != "full" and not lora:
        raise ConfigError(f"--format {args.format}: the run trained all weights (adapter.mode=full); use --format full")
    if args.format == "diffusers":
        path = save_diffusers_lora(run.model, out, dtype=dtype)
    elif args.format == "comfyui":
        path = save_comfyui_lora(run.model, out / COMFYUI_FILE, dtype=dtype)
    else:
        path = save_full_weights(run.roles.student_model, out, "student" if lora else None, dtype)
    print(json.dumps({"checkpoint": str(run.loaded_from), "format": args.format, "written": str(path)}, indent=1))
    return 0


def _continual(args: argparse.Namespace) -> int:
    from .train.continual import buildable, describe, load_plan, run_plan

    plan = load_plan(args.plan)
    if args.dry_run:
        print(yaml.safe_dump({"continual": describe(plan)}, sort_keys=False, default_flow_style=None), end="")
        problem = buildable(plan)
        print(f"plan OK: `dopsd continual` would run these {len(plan.stages)} stages" if problem is None
              else f"plan is valid, but this version cannot train it yet: {problem}")
        return 0
    state = run_plan(plan, progress=not args.no_progress)
    print(json.dumps({"stages": [{k: e[k] for k in ("name", "between", "lora", "merged")} for e in state["stages"]],
                      "retention": str(plan.output_dir / "retention.md")}, indent=1))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .train.assemble import fill_caches

    report = fill_caches(load_config(args.config, args.set), progress=not args.no_progress)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dopsd", description="D-OPSD trainer for step-distilled diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config or preset name (e.g. tiny-cpu)")
    t.add_argument("config", nargs="?", default="tiny-cpu", help="YAML path or preset name (default: tiny-cpu)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
    t.add_argument("--dry-run", action="store_true", help="validate the config and print the resolved plan and the "
                   "per-rank memory plan; load no weights")
    t.add_argument("--world-size", type=int, default=None, metavar="N", help="with --dry-run: plan the memory of N "
                   "ranks (default: the launcher's WORLD_SIZE, else 1)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the per-step table still prints)")
    t.add_argument("--no-samples", action="store_true", help="skip the before/after sample grid")
    # the `deepspeed` launcher appends --local_rank=N (the rank is read from the environment)
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("sample", help="few-step samples from a training run's checkpoint")
    s.add_argument("run", help="the run's output_dir (holds config.yaml and checkpoints/)")
    s.add_argument("--checkpoint", default=None, help="a step-XXXXXX directory, or its name under the run's checkpoints/ "
                   "(default: the newest)")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: captions from the data")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: sample.steps of the run's config)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png", help="PNG path for the grid")
    d = sub.add_parser("demo", help="the miniature world: D-OPSD vs SFT on a new concept, measured (CPU, minutes)")
    d.add_argument("--out", default=DEMO_OUT, help="folder for the report and the PNG grids (--continual: default "
                   f"{DEMO_OUT}-continual)")
    d.add_argument("--continual", action="store_true", help="teach three concepts in turn (zorp, wug, fep) with SFT and "
                   "D-OPSD, with and without anchors, and measure forgetting, few-step retention and colour bleed")
    d.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations for each method (default 200; "
                   "--continual: 100 per stage)")
    d.add_argument("--eval-prompts", type=int, default=None, help="prompts per evaluation set (default 128; "
                   "--continual: 64)")
    d.add_argument("--multi-steps", type=int, default=32, help="the multi-step schedule compared with 4 steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--anchor", type=int, default=None, help="ordinary captions per iteration in an anchor term (default "
                   "0: none, as the authors; --continual: 4, in the anchored arms)")
    d.add_argument("--between", choices=["merge", "keep"], default="merge", help="--continual: fold each stage's "
                   "LoRA into the base before the next (merge, default) or train one LoRA on (keep)")
    d.add_argument("--arms", default=None, metavar="ARM,...", help="--continual: only these arms, by name in lower "
                   "case with dashes, e.g. d-opsd-self-distil,sft-replay; default all five")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a world-demo preset key")
    e = sub.add_parser("export", help="write a run's student as a diffusers or ComfyUI LoRA, or as full diffusers weights")
    e.add_argument("run", help="the run's output_dir")
    e.add_argument("--format", choices=["diffusers", "comfyui", "full"], default="diffusers",
                   help="diffusers: pytorch_lora_weights.safetensors (the pipeline's load_lora_weights); comfyui: "
                        "ComfyUI's model keys (fused qkv; FLUX.2: BFL names); full: merged transformer/ folder")
    e.add_argument("--checkpoint", default=None, help="a step-XXXXXX directory, or its name under the run's checkpoints/ "
                   "(default: the newest)")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the run's model.dtype")
    e.add_argument("--out", required=True, help="output folder")
    k = sub.add_parser("continual", help="a continual plan: stages trained one after another, LoRA merged or kept "
                       "between them, retention measured after each (resumes where it stopped)")
    k.add_argument("plan", help="the plan YAML (base config, output_dir, between: merge | keep, stages)")
    k.add_argument("--dry-run", action="store_true", help="validate every stage's config and print the plan; load no weights")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = sub.add_parser("cache", help="compute the text / multimodal features and VAE latents of an image folder ahead of training")
    c.add_argument("config", help="YAML path or preset name (the data.*, model.* and context.* keys are used)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        with quiet() if getattr(args, "no_progress", False) else contextlib.nullcontext():     # every bar, not only training's
            return {"train": _train, "sample": _sample, "demo": _demo, "cache": _cache, "export": _export,
                    "continual": _continual}[args.command](args)
    except (ConfigError, CheckpointError, WeightsError, DataError, MissingExtra, OutputDirBusy) as err:
        print(f"dopsd: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:          # the disk filled up or turned read-only mid-run (checkpoints: CheckpointError)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"dopsd: error: {err.filename or 'writing'}: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:          # every rank stopped at the same step (train/stop.py)
        if rank() == 0:
            print(f"dopsd: {stopped}", file=sys.stderr)
        destroy_process_group()
        return EXIT_STOPPED
    except TrainingDiverged as err:         # every rank saw the same bad steps (train/finite.py)
        if rank() == 0:
            print(f"dopsd: error: {err}", file=sys.stderr)
        destroy_process_group()
        return EXIT_DIVERGED


def run(argv: list[str] | None = None) -> NoReturn:
    """The `dopsd` command: ``main``, then ``end_process``, which ends a rank that joined a process group without the
    interpreter's teardown (distributed.end_process says why); also after an uncaught exception, exit 1 as Python's."""
    try:
        code = main(argv)
    except Exception:
        traceback.print_exc()
        code = 1
    end_process(code)


if __name__ == "__main__":
    run()
