"""Atomic, resumable checkpoints in safetensors (never pickle).

Layout of ``<output_dir>/checkpoints/step-000050/``:
  student.safetensors    trainable tensors (LoRA student adapter, or all weights in full mode)
  teacher.safetensors    EMA teacher, fp32 master copy
  optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
  rng.safetensors        noise-generator and global torch RNG states
  state.json             step, data-stream position, optimizer hyper-parameters, config; written last
A DeepSpeed run (train/deepspeed_engine.py) writes the engine's shards under ``deepspeed/`` instead of
optimizer.safetensors, and one ``rng-rankNNNNN.safetensors`` per rank instead of rng.safetensors.

A checkpoint is written into ``step-XXXXXX.tmp`` and renamed when complete, so a crash mid-write never
leaves a directory that looks complete and never touches the previous checkpoints.

Resuming compares the run's config with the one in ``state.json`` (``resume_changes``): a run may be extended
or watched differently, but a checkpoint of another experiment is refused rather than silently trained on.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..models.loading import describe_mismatch
from .config import Config


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def load_tensors(path: Path, expected: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Load a safetensors file; with ``expected``, check that keys and shapes match exactly."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint directory is incomplete, resume from an earlier one")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); resume from an earlier checkpoint") from None
    if expected is not None:
        mismatch = describe_mismatch({k: tuple(v.shape) for k, v in tensors.items()},
                                     {k: tuple(v.shape) for k, v in expected.items()})
        if mismatch:
            raise CheckpointError(f"{path}: keys do not match the model: {mismatch}. Was it written with another "
                                  "model/adapter config (model.arch, adapter.rank, adapter.targets)?")
    return tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Optimizer state keyed by parameter name, plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {f"{names[i]}::{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, Tensor], groups: list[dict]) -> None:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise CheckpointError(f"optimizer state names parameter {name!r}, which the model does not have")
        state.setdefault(index[name], {})[field] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state does not fit this run's optimizer ({err})") from None


def save_checkpoint(root: Path, step: int, parts: dict[str, dict[str, Tensor]], state: dict[str, Any], keep_last: int) -> Path:
    tmp = begin_checkpoint(root, step)
    for name, tensors in parts.items():
        save_tensors(tmp / f"{name}.safetensors", tensors)
    return publish_checkpoint(root, step, state, keep_last)


def begin_checkpoint(root: Path, step: int) -> Path:
    """An empty ``step-XXXXXX.tmp`` to write the parts into (other ranks may write there too, then publish)."""
    root.mkdir(parents=True, exist_ok=True)
    for partial in root.glob("step-*.tmp"):      # leftovers of an interrupted save: never complete
        shutil.rmtree(partial, ignore_errors=True)
    tmp = pending_dir(root, step)
    tmp.mkdir()
    return tmp


def pending_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}.tmp"


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file(_contiguous(tensors), str(path))


def publish_checkpoint(root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state.json`` last, rename the pending directory into place and prune to ``keep_last``."""
    final, tmp = root / f"step-{step:06d}", pending_dir(root, step)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():                     # re-saving the same step: move the old copy aside first
        old = root / f"step-{step:06d}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (a ``state.json`` present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*")
             if re.fullmatch(r"step-\d+", p.name) and p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(ckpt: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    path = ckpt / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no state.json, so this is not a complete checkpoint directory "
                              f"(pass a step-XXXXXX directory written by `dopsd train`)")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err}); resume from an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt (expected a JSON object, got {type(state).__name__}); "
                              "resume from an earlier checkpoint")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; not written by this version of `dopsd train`, "
                              "resume from another checkpoint")
    return state


def find_checkpoint(root: Path, name: str) -> Path:
    """``name``: a checkpoint directory, or the name of one under ``root`` (``step-000300``)."""
    path = Path(name)
    if not path.is_dir() and (root / name).is_dir():
        path = root / name
    if not path.is_dir():
        found = ", ".join(p.name for p in list_checkpoints(root)) or "none yet"
        raise CheckpointError(f"{name}: no such checkpoint directory (neither a path nor a name under {root}); "
                              f"complete checkpoints there: {found}")
    read_state(path)            # a folder without state.json was never completed
    return path


# Config keys a resumed run may change: they extend the run or change how it is executed, logged, checkpointed or
# validated, never what a training step computes from the same weights, data and noise. Any other difference
# makes it another experiment (objective, loss, model, adapter, data, context, optimizer, schedule, seed, batch),
# which must not continue from this run's weights, optimizer moments and data position. A section name covers
# all its keys.
RESUMABLE = (
    "train.steps",                                  # the same run, longer (or already done)
    "train.output_dir", "train.resume",             # where the run is found: its folder may have been moved
    "train.log_every", "train.tensorboard", "train.peak_tflops", "deepspeed.comm_timing",   # logging, MFU
    "train.checkpoint_every", "train.keep_last",
    "validation",                                   # grids only: no training RNG drawn (tests/train/test_validation.py)
    "sample.steps", "sample.prompts", "sample.seed",  # the grid after training (sample.shift also sets the
                                                      # training sigmas of method.schedule=model)
    "data.cache_dir",                               # the cache is keyed by content and encoder: same features
    # The same maths executed differently (rounding may differ): another device or kernel implementation,
    # recomputed activations, per-step or whole-roll-out backward (same gradients, tests/method), ZeRO-3's gather
    # schedule; worth changing when a resumed run runs out of memory.
    "train.device", "model.ops_backend", "model.checkpointing", "model.compile", "train.memory_budget_gb",
    "method.per_step_backward",
    "deepspeed.gather_once", "deepspeed.timeout_s",
)
# Keys of older versions that only said how a run executed (a new config naming one fails, config._RETIRED).
RETIRED = ("model.gradient_checkpointing", "method.packed_forward")
_ABSENT = object()       # a key one of the two configs lacks


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf; mappings (model.arch, deepspeed.extra) are walked, so an empty one adds
    no key and each of its entries is compared on its own."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(path: Path, saved: dict[str, Any], cfg: Config) -> list[str]:
    """The config changes since ``path`` was written ("key: old -> new"), all of them RESUMABLE; raises naming
    every other changed key. ``saved`` is the checkpoint's config; keys it lacks (an older version) take defaults."""
    old = {k: v for k, v in {**_flat(Config().to_dict()), **_flat(saved)}.items() if k not in RETIRED}
    new = _flat(cfg.to_dict())
    changed = {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(old.keys() | new.keys())
               if old.get(k, _ABSENT) != new.get(k, _ABSENT)}
    described = {k: f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items()}
    refused = [d for k, d in described.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
    if refused:
        raise CheckpointError(f"{path}: written by another experiment ({'; '.join(refused)}); resuming it would "
                              "train this config on that run's weights. Give this run its own folder (--set "
                              "train.output_dir=NEW_DIR) or start from scratch (--set train.resume=null)")
    return list(described.values())


def resume_note(path: Path, step: int, steps: int, changes: list[str]) -> str:
    """One line on what a resume continues: the allowed changes, and whether anything is left to train."""
    note = f"resumed from {path} at step {step}"
    if changes:
        note += f"; changed since: {', '.join(changes)}"
    if step >= steps:
        note += f"; nothing left to train (train.steps={steps}): raise train.steps to train on"
    return note
