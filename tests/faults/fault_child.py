"""`dopsd train` with one fault planted at an exact point, for tests/faults: the child SIGKILLs itself there (or, for
NaN injection, poisons one gradient and trains on). The point comes from DOPSD_FAULT, a JSON mapping written by
fault_harness.Fault.env(); without it this is plain `dopsd`. Everything it patches is the test's: the package
holds no fault hooks.

Points (``step``: the checkpoint or training step the fault waits for):
  save-part    while checkpoint ``step`` is written: part number ``part`` is written, cut to ``frac`` of its
               bytes, then SIGKILL (a kill mid-write, with a torn file in step-XXXXXX.tmp)
  prune        after checkpoint ``step`` is renamed into place, at the prune's first removal: SIGKILL before it
               (``frac`` < 0) or after removing one file (seeded by ``part``) of the folder it removes
  base         at startup, base.safetensors written and cut to ``frac`` of its bytes, then SIGKILL
  nan          one gradient of step ``step`` set to NaN before the optimizer step; training goes on
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

FAULT = json.loads(os.environ.get("DOPSD_FAULT", "{}"))


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def cut(path: Path, frac: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * frac))


def plant(fault: dict) -> None:
    from dopsd_fast.train import checkpoint as ckpt
    from dopsd_fast.train import trainer as trainer_mod

    point, step = fault.get("point"), fault.get("step", 0)
    if point == "save-part":
        save, written = ckpt.save_tensors, []

        def save_tensors(path, tensors):
            save(path, tensors)
            if path.parent.name == f"step-{step:06d}.tmp":
                written.append(path)
                if len(written) == fault["part"]:
                    cut(path, fault["frac"])
                    die()
        ckpt.save_tensors = save_tensors
    elif point == "prune":
        rmtree = ckpt.shutil.rmtree

        class Shutil:                                   # checkpoint.py's `shutil`, with a deadly rmtree
            def __getattr__(self, name):
                return getattr(ckpt.shutil_real, name)

            @staticmethod
            def rmtree(path, *args, **kwargs):
                final = Path(path).parent / f"step-{step:06d}"
                if (final / "state.json").is_file() and not ckpt.pending_dir(Path(path).parent, step).exists():
                    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                    if fault["frac"] >= 0 and files:
                        files[fault["part"] % len(files)].unlink()
                    die()
                return rmtree(path, *args, **kwargs)
        ckpt.shutil_real, ckpt.shutil = ckpt.shutil, Shutil()
    elif point == "base":
        save_file = trainer_mod.save_file

        def save_base(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if Path(filename).name.startswith("base.safetensors"):       # (written aside, then renamed)
                cut(Path(filename), fault["frac"])
                die()
        trainer_mod.save_file = save_base
    elif point == "nan":
        optimizer_step = trainer_mod.Trainer.optimizer_step

        def poisoned(self, loss=0.0):
            if self.step + 1 == step:
                next(p for p in self.roles.trainable.values() if p.grad is not None).grad.view(-1)[0] = float("nan")
            return optimizer_step(self, loss)
        trainer_mod.Trainer.optimizer_step = poisoned
    elif point is not None:
        raise SystemExit(f"fault_child: unknown point {point!r}")


if __name__ == "__main__":
    plant(FAULT)
    from dopsd_fast.cli import run

    run(sys.argv[1:])
