"""Builders for tests and benchmarks: the tiny preset in a temporary directory, seeded adapter weights, a
`dopsd train` child process to signal, and its metrics.jsonl."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dopsd_fast.train.config import load_config
from dopsd_fast.train.trainer import make_trainer


def module_from_file(path: Path):
    """The Python file at ``path`` as a module: bench/ and csrc/ are not packages on sys.path (CONTRIBUTING)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0, norm_spread: float = 0.1,
                      other_scale: float = 0.1) -> torch.nn.Module:
    """Random weights at a realistic scale, nothing left at zero (every gradient path carries signal): unit-variance
    linear outputs, norm weights 1 +- ``norm_spread``, other vectors (biases, adaLN, pads) ``other_scale`` x N(0, 1)."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.dim() >= 2 and "pad_token" not in name:
            p.copy_(noise / math.sqrt(p.shape[1]))
        elif "norm" in name or name.startswith("cap_embedder.0"):
            p.copy_(1.0 + norm_spread * noise)
        else:
            p.copy_(other_scale * noise)
    return model


def tiny_trainer(tmp_path, *overrides: str):
    cfg = load_config("tiny-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", *overrides])
    return make_trainer(cfg, progress=False)


@torch.no_grad()
def randomize_adapters(trainer, seed: int = 0, scale: float = 0.05) -> None:
    """Give student and teacher different non-zero weights (at init B = 0, so dL/dA would be 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in list(trainer.roles.trainable.values()) + trainer.roles.ema.teacher:
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    trainer.roles.trainable_changed()
    trainer.roles.ema.load_state_dict({k: t.clone() for k, t in zip(trainer.roles.ema.names, trainer.roles.ema.teacher)})


def train_process(out: Path, *overrides: str, script: Path | None = None, **env: str) -> subprocess.Popen:
    """`dopsd train tiny-cpu` into ``out`` (resume auto) as a child process to signal: one thread, the PyTorch
    reference ops, no sample grids; stdout and stderr piped together. ``script``: a Python file that takes
    `dopsd`'s arguments instead of the console script (tests/faults/fault_child.py); ``env``: added variables."""
    sets = [f"train.output_dir={json.dumps(str(out))}", "train.resume=auto", *overrides]
    entry = [sys.executable, str(script)] if script else [str(Path(sys.executable).with_name("dopsd"))]
    cmd = [*entry, "train", "tiny-cpu", "--no-samples", "--no-progress", *[a for o in sets for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DOPSD_BACKEND": "reference", **env}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics_rows(out: Path) -> list[dict]:
    """The rows of ``<out>/metrics.jsonl`` in file order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``proc`` (alive throughout, else the assert shows its output) has logged ``n`` rows in ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    raise TimeoutError(f"{out}: fewer than {n} logged steps after {timeout} s")


def folder_contents(folder: Path) -> dict:
    """Each file under ``folder``: its bytes, or a safetensors file's (metadata, tensors): the writer orders the
    header's metadata keys by a per-process hash, so equal safetensors files need not be equal bytes."""
    from safetensors import safe_open

    def read(path: Path):
        if path.suffix != ".safetensors":
            return path.read_bytes()
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    return {str(p.relative_to(folder)): read(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def same_contents(a: dict, b: dict) -> bool:
    """Two ``folder_contents``: the same files, bytes, metadata, tensor names, dtypes and values."""
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], bytes):
            if a[k] != b[k]:
                return False
        else:
            (ma, ta), (mb, tb) = a[k], b[k]
            if ma != mb or ta.keys() != tb.keys() or any(not torch.equal(ta[n], tb[n]) or ta[n].dtype != tb[n].dtype
                                                       for n in ta):
                return False
    return True


def image_folder(root: Path, n: int = 10) -> Path:
    """``n`` random PNGs in ``root`` (created) in three aspect buckets (square, wide, tall), each with two caption
    variants in metadata.jsonl."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        w, h = [(64, 64), (120, 48), (48, 120)][i % 3]
        g = torch.Generator().manual_seed(i)
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": [f"short {i}", f"long {i}"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root
