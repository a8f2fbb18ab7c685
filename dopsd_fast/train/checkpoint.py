"""Atomic, resumable checkpoints in safetensors (never pickle).

Layout of ``<output_dir>/checkpoints/step-000050/``:
  student.safetensors    trainable tensors (LoRA student adapter, or all weights in full mode)
  teacher.safetensors    EMA teacher, fp32 master copy
  optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
  rng.safetensors        noise-generator and global torch RNG states
  state.json             step, data-stream position, optimizer hyper-parameters, lr scheduler (train/optim.py),
                         config; written last
  pytorch_lora_weights.safetensors, lora_comfyui.safetensors
                         the student's LoRA for diffusers / ComfyUI (train.export_formats; LoRA runs only)
A DeepSpeed run (train/deepspeed_engine.py) adds the engine's shards under ``deepspeed/`` (its same-layout resume)
and writes one ``rng-rankNNNNN.safetensors`` per rank instead of rng.safetensors; its student, teacher and
optimizer files are the whole fp32 tensors above (train/reshard.py), so any world size or ZeRO stage, or the
single-process trainer, resumes it.

A checkpoint is written into ``step-XXXXXX.tmp`` and renamed when complete, so a crash mid-write never
leaves a directory that looks complete and never touches the previous checkpoints.
A tensor holding NaN or Inf is refused by name on both sides: nothing of a checkpoint is written when one
would be (``refuse_nonfinite_save``), and ``load_tensors`` never returns one (train/finite.py).

Resuming compares the run's config with the one in ``state.json`` (``resume_changes``): a run may be extended
or watched differently, but a checkpoint of another experiment is refused rather than silently trained on.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..models.loading import describe_mismatch, first_nonfinite
from .config import RETIRED, Config, ConfigError
from .optim import join_state_entries, json_value, state_entries


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
        odd = next((k for k, v in expected.items() if v.is_floating_point() != tensors[k].is_floating_point()), None)
        if odd is not None:
            raise CheckpointError(f"{path}: tensor {odd!r} is {tensors[odd].dtype}, but the run holds "
                                  f"{expected[odd].dtype} there; the file was not written by this run's `dopsd train`: "
                                  "resume from an earlier checkpoint")
    refuse_nonfinite_load(path, tensors)
    return tensors


def refuse_nonfinite_load(path: Path, tensors: dict[str, Tensor]) -> None:
    """CheckpointError naming the first tensor of ``path`` that holds NaN or Inf: never train on from one."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or Inf values (written by a diverged run, or the file "
                              "is corrupt); resume from an earlier checkpoint (--set train.resume=PATH) or start over "
                              "(--set train.resume=null)")


def refuse_nonfinite_save(final: Path, parts: dict[str, dict[str, Tensor]]) -> None:
    """CheckpointError naming the first part and tensor that holds NaN or Inf, raised before ``final`` is
    written: a checkpoint never holds a non-finite tensor, and the previous ones stay as they are."""
    flat = {(name, k): v for name, tensors in parts.items() for k, v in tensors.items()}     # one pass, one sync
    bad = first_nonfinite(flat)
    if bad is not None:
        raise CheckpointError(f"{final}: not written: {bad[0]} tensor {bad[1]!r} holds NaN or Inf values; the "
                              f"previous checkpoints in {final.parent} are kept. Resume from the newest of them with "
                              "a lower optim.lr")


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Optimizer state keyed by parameter name, plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {e: t for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)
               for e, t in state_entries(f"{names[i]}::{k}", v).items()}
    groups = [{k: json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, Tensor], groups: list[dict],
                   where: Path | None = None) -> None:
    """Restore ``optimizer`` from its tensors (optimizer.safetensors) and param groups (state.json) in checkpoint
    ``where``, after checking them: torch's ``load_state_dict`` takes a moment of the wrong shape, a missing one or a
    string learning rate without a word, and the run then fails at its first step, after writing its run files."""
    tensor_file = where / "optimizer.safetensors" if where else "optimizer state"
    state_file = where / "state.json" if where else "optimizer param_groups"
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise CheckpointError(f"{tensor_file}: optimizer state names parameter {name!r}, which the model does not "
                                  "have; resume from a checkpoint of this run")
        state.setdefault(index[name], {})[field] = v
    try:
        state = {i: join_state_entries(fields) for i, fields in state.items()}
    except ValueError as err:
        raise CheckpointError(f"{tensor_file}: {err}; resume from a checkpoint of this run") from None
    problem = _optimizer_state_problem(optimizer, names, state) or _param_groups_problem(optimizer, groups)
    if problem:
        where_ = state_file if problem.startswith("param_groups") else tensor_file
        raise CheckpointError(f"{where_}: {problem}; the file was edited or not written by this run's `dopsd train`: "
                              "resume from an earlier checkpoint (--set train.resume=PATH) or start over "
                              "(--set train.resume=null)")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{state_file}: optimizer state does not fit this run's optimizer ({err})") from None
    for group, lr in zip(optimizer.param_groups, lrs):     # a tensor lr (AdamW8bit's) stays that tensor
        if torch.is_tensor(lr):
            group["lr"] = lr.fill_(group["lr"])


def _optimizer_state_problem(optimizer: torch.optim.Optimizer, names: list[str],
                             state: dict[int, dict[str, Tensor]]) -> str | None:
    """A parameter's state lacking a field (Adam: step, exp_avg, exp_avg_sq) or a moment not of its parameter's
    shape, named; None when it fits. A parameter without any state is allowed: it never had a gradient."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    need = set().union(*(s.keys() for s in state.values()))          # a field one parameter has, every one needs
    if isinstance(optimizer, torch.optim.Adam):                        # AdamW too
        need |= {"step", "exp_avg", "exp_avg_sq"}
        need |= {"max_exp_avg_sq"} if any(g.get("amsgrad") for g in optimizer.param_groups) else set()
    for i, fields in sorted(state.items()):
        missing = sorted(need - fields.keys())
        if missing:
            return f"{names[i]}::{missing[0]} is missing ({len(missing)} of its fields)"
        for field, t in sorted(fields.items()):
            want = () if field == "step" else tuple(params[i].shape)
            if tuple(t.shape) != want and not (field == "step" and t.numel() == 1):
                return f"{names[i]}::{field} has shape {tuple(t.shape)}, the parameter needs {want}"
            if not t.is_floating_point():
                return f"{names[i]}::{field} is {t.dtype}, expected a floating-point tensor"
    return None


def _param_groups_problem(optimizer: torch.optim.Optimizer, groups: Any) -> str | None:
    """A saved param group value whose type differs from what this run's optimizer holds (``"lr": "x"``), named."""
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return "param_groups is not a list of mappings"
    for n, (saved, ours) in enumerate(zip(groups, optimizer.param_groups)):
        for k, v in saved.items():
            have = ours.get(k)
            have = have.item() if torch.is_tensor(have) else have      # AdamW8bit's lr
            if k == "params":
                ok = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            elif have is None:
                ok = True
            elif isinstance(have, bool):
                ok = isinstance(v, bool)
            elif isinstance(have, (int, float)):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            elif isinstance(have, (tuple, list)):
                ok = isinstance(v, list) and len(v) == len(have) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            else:
                ok = isinstance(v, type(have))
            if not ok:
                return f"param_groups[{n}].{k} is {json.dumps(v)}, but this run's optimizer holds {have!r} there"
    return None


def save_checkpoint(root: Path, step: int, parts: dict[str, dict[str, Tensor]], state: dict[str, Any], keep_last: int,
                    files: dict[str, tuple[dict[str, Tensor], dict[str, str]]] | None = None) -> Path:
    """``parts``: name -> tensors, written as ``<name>.safetensors``; ``files``: file name -> (tensors, header) written
    beside them inside the same atomic write (the LoRA exports, models/export.py ``lora_files``)."""
    files = files or {}
    refuse_nonfinite_save(root / f"step-{step:06d}", {**parts, **{name: t for name, (t, _) in files.items()}})
    try:
        tmp = begin_checkpoint(root, step)
        for name, tensors in parts.items():
            save_tensors(tmp / f"{name}.safetensors", tensors)
        for name, (tensors, header) in files.items():
            save_file_with_header(tmp / name, tensors, header)
        return publish_checkpoint(root, step, state, keep_last)
    except WRITE_ERRORS as err:
        raise write_failed(root, step, err) from None


# What writing a checkpoint raises when the disk refuses: safetensors reports a full disk as SafetensorError, not
# OSError; torch.save (DeepSpeed's shards) as a RuntimeError of its stream writer, which write_failed tells apart.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_failed(root: Path, step: int, err: Exception) -> Exception:
    """The error to raise for ``err`` while writing checkpoint ``step``: its pending folder removed, a CheckpointError
    naming it and the fix; a RuntimeError that is not a failed write comes back as it was (a bug, not the disk)."""
    if isinstance(err, RuntimeError) and not isinstance(err, SafetensorError) and "write" not in str(err).lower():
        return err
    shutil.rmtree(pending_dir(root, step), ignore_errors=True)
    return CheckpointError(f"{root / f'step-{step:06d}'}: not written: {describe_os_error(err)}; the complete "
                           f"checkpoints in {root} are kept (resume from the newest)")


def describe_os_error(err: Exception) -> str:
    """What an OS error while writing means and what to do: a full disk, a read-only or forbidden folder, other."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())
    code = getattr(err, "errno", None)
    if code is None:                            # SafetensorError: "... No space left on device (os error 28) ..."
        m = re.search(r"os error (\d+)", text)
        code = int(m[1]) if m else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{text}: the disk is full; free space there or set train.output_dir on another disk"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{text}: the folder is not writable; fix its permissions or set train.output_dir elsewhere"
    return text


def check_writable(folder: Path) -> None:
    """ConfigError naming ``folder`` (train.output_dir) when this process cannot write there (read-only, full, a
    file in the way), raised before a run writes anything: a 4 KiB probe file is written, synced and removed in
    ``folder``, or, before it exists, in its nearest existing parent; no folder is created."""
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        below = "" if probe_dir == folder else f", so {folder} cannot be created"
        raise ConfigError(f"train.output_dir: {probe_dir} is a file, not a folder{below}; set train.output_dir to a "
                          "folder path")
    try:
        fd, name = tempfile.mkstemp(prefix=".dopsd-write-probe-", dir=probe_dir)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot write into {probe_dir} ({describe_os_error(err)})") from None


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


def save_file_with_header(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """A file a reader other than the resume reads (the LoRA exports): safetensors with ``header`` as metadata."""
    save_file(_contiguous(tensors), str(path), metadata=header)


def publish_files(ckpt: Path, folder: Path, names: list[str]) -> list[Path]:
    """Copy files ``names`` of checkpoint ``ckpt`` into ``folder`` (the run's LoRA at the end of training, where
    diffusers' scripts put it), each through a temporary name and a rename: never a half-written file there."""
    written = []
    for name in names:
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(ckpt / name, tmp)
        os.replace(tmp, folder / name)
        written.append(folder / name)
    return written


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
        # renamed out of the complete ones first: a kill mid-delete must not leave a checkpoint that lists as
        # complete (state.json kept) with parts gone, nor one never pruned (state.json gone first); the next
        # begin_checkpoint clears a leftover step-*.tmp
        doomed = pending_dir(root, int(stale.name.split("-")[1]))
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(stale, doomed)
        shutil.rmtree(doomed)
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
    for key, (ok, want) in STATE_TYPES.items():
        head, _, leaf = key.partition(".")
        parent = state if not leaf else state.get(head)
        if leaf and not isinstance(parent, dict):
            continue                            # the section itself is checked (or absent, and not required)
        name = leaf or head
        if leaf and name not in parent and head in required:
            raise CheckpointError(f"{path}: lacks {key}; resume from another checkpoint")
        if name in parent and not ok(parent[name]):
            raise CheckpointError(f"{path}: {key} is {json.dumps(parent[name])}, expected {want}; the file was edited "
                                  "or not written by `dopsd train`: resume from another checkpoint")
    return state


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# What each state.json key must hold when present: a hand-edited or foreign file is refused on read, naming the
# key, instead of failing mid-resume (int("abc")) or after the run files are rewritten.
STATE_TYPES = {
    "step": (_count, "an integer >= 0"),
    "world_size": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "data": (lambda v: isinstance(v, dict), "a mapping (the data stream's position)"),
    "data.epoch": (_count, "an integer >= 0"),
    "data.position": (_count, "an integer >= 0"),
    "param_groups": (lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v), "a list of mappings"),
    "scheduler": (lambda v: isinstance(v, dict), "a mapping (the learning-rate scheduler's state)"),
    "scheduler.last_epoch": (_count, "an integer >= 0 (the optimizer steps taken)"),
    "config": (lambda v: isinstance(v, dict), "a mapping (the run's config)"),
}


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
    "train.log_every", "train.report_to", "train.peak_tflops", "deepspeed.comm_timing",   # logging, MFU
    "train.checkpoint_every", "train.keep_last", "train.export_formats",
    "train.max_bad_steps",                          # when to give up on non-finite steps (skipped either way)
    "validation",                                   # grids only: no training RNG drawn (tests/train/test_validation.py)
    "sample.steps", "sample.prompts", "sample.seed",  # the grid after training (sample.shift also sets the
                                                      # training sigmas of method.schedule=model)
    "data.cache_dir", "data.encode_missing",        # the cache is keyed by content and encoder: same features
    "data.num_workers",                             # who decodes, not what: the same batches (tests/data)
    # The same maths executed differently (rounding may differ): another device or kernel implementation,
    # recomputed activations, per-step or whole-roll-out backward (same gradients, tests/method), ZeRO-3's gather
    # schedule; worth changing when a resumed run runs out of memory.
    "train.device", "model.ops_backend", "model.checkpointing", "model.compile", "train.memory_budget_gb",
    "method.per_step_backward",
    "deepspeed.gather_once", "deepspeed.timeout_s",
    # Another ZeRO stage, or the single-process trainer (null): the same AdamW on the same fp32 state, which a
    # resume on another layout reads from the safetensors files (deepspeed_engine.py ``_load_resharded``). The
    # world size is no config key: the global batch becomes train.batch_size x the new world size.
    "deepspeed.stage",
)
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
