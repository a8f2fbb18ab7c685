"""Helpers for the 2-process CPU tests (gloo): launch `dopsd train` under torchrun or as bare ranks; a pretrained
folder for them to start from."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.testing import metrics_rows
from dopsd_fast.train.distributed import free_port

RUN_CLI = str(Path(__file__).with_name("run_cli.py"))
TINY = ["tiny-cpu", "--no-samples", "--no-progress", "--set", "train.resume=auto", "--set", "train.log_every=1"]


def rank_env(**extra: str) -> dict[str, str]:
    # tests/conftest.py turns the Triton interpreter on; the ranks run the PyTorch reference ops (20x faster on CPU)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DOPSD_BACKEND="reference", **extra)
    return env


def train_args(out: Path, *sets: str) -> list[str]:
    return [*TINY, "--set", f"train.output_dir={out}", *[a for s in sets for a in ("--set", s)]]


def torchrun(out: Path, *sets: str, nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           RUN_CLI, "train", *train_args(out, *sets)]
    return subprocess.Popen(cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def bare_ranks(out: Path, *sets: str, world: int = 2) -> list[subprocess.Popen]:
    """One `dopsd train` process per rank and no launcher: each rank's own pid and exit code (kill the survivors)."""
    args, port = [sys.executable, RUN_CLI, "train", *train_args(out, *sets)], str(free_port())
    return [subprocess.Popen(args, env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def logged_rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step; each step logged once (a resume drops the rows past its checkpoint)."""
    rows = metrics_rows(out)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"{out / 'metrics.jsonl'}: steps {steps}"
    return {r["step"]: r for r in rows}


def diffusers_folder(path: Path, arch: dict) -> int:
    """A diffusers transformer/ folder of random weights (our module names are diffusers' keys); its bytes."""
    torch.manual_seed(0)
    state = ZImageTransformer(ZImageConfig.from_dict(arch)).state_dict()
    path.mkdir()
    save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **arch}))
    return sum(t.numel() * t.element_size() for t in state.values())
