"""optim.name=adamw8bit (torchao's AdamW8bit, train/optim.py): it follows fp32 AdamW, its 8-bit moments go through
a checkpoint bit for bit (the restored optimizer continues exactly like the original), and a run trains and resumes
with it. The refusals live in tests/train/test_config.py's style: a ConfigError naming the key."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("torchao")

from dopsd_fast.train.checkpoint import load_optimizer, load_tensors, optimizer_tensors  # noqa: E402
from dopsd_fast.train.config import ConfigError, load_config  # noqa: E402
from dopsd_fast.train.optim import build_optimizer, build_scheduler  # noqa: E402

# a 64x128 weight (8192 values: 8-bit moments, 32 blocks of 256) and a bias (fp32 moments: under 4096 values)
SHAPES = {"w": (64, 128), "b": (128,)}


def params(seed: int) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}


def optimizer(ps, name: str = "adamw8bit"):
    cfg = load_config("tiny-cpu", [f"optim.name={name}", "optim.lr=1e-2", "optim.weight_decay=0.01",
                                    "optim.scheduler=cosine", "train.steps=10"])
    opt = build_optimizer(ps.values(), cfg)
    return opt, build_scheduler(opt, cfg)


def steps(ps, opt, sched, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()


def test_follows_fp32_adamw():
    """Independent reference: torch's AdamW on the same gradients. The 8-bit moments cost a little accuracy, the
    step still points the same way: after 5 steps the weight's move is 9.0e-3 off fp32 AdamW's, relative (asserted
    < 5e-2); the bias (fp32 moments) 9.4e-6, torchao's compiled step rounding differently."""
    p8, p32 = params(0), params(0)
    (o8, s8), (o32, s32) = optimizer(p8), optimizer(p32, "adamw")
    start = {n: p.detach().clone() for n, p in p32.items()}
    steps(p8, o8, s8, 5, seed=1)
    steps(p32, o32, s32, 5, seed=1)
    assert type(o8.state[p8["w"]]["exp_avg"]).__name__ == "OptimState8bit"
    assert type(o8.state[p8["b"]]["exp_avg"]) is torch.Tensor
    for n in SHAPES:
        moved8, moved32 = p8[n].detach() - start[n], p32[n].detach() - start[n]
        assert (moved8 - moved32).norm() / moved32.norm() < 5e-2, n
        assert p8[n].dtype == torch.float32


def test_checkpoint_round_trip_is_exact(tmp_path):
    ps, ps2 = params(0), params(9)
    opt, sched = optimizer(ps)
    steps(ps, opt, sched, 3, seed=1)
    names = list(ps)
    tensors, groups = optimizer_tensors(opt, names)
    assert tensors["w::exp_avg.codes"].dtype == torch.uint8 and "b::exp_avg" in tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "optimizer.safetensors"))

    opt2, sched2 = optimizer(ps2)
    with torch.no_grad():
        for n in names:
            ps2[n].copy_(ps[n])
    load_optimizer(opt2, names, load_tensors(tmp_path / "optimizer.safetensors"), json.loads(json.dumps(groups)))
    sched2.load_state_dict(sched.state_dict())
    assert torch.is_tensor(opt2.param_groups[0]["lr"])      # what AdamW8bit's compiled step needs
    steps(ps, opt, sched, 2, seed=2)
    steps(ps2, opt2, sched2, 2, seed=2)
    for n in names:
        assert torch.equal(ps[n], ps2[n]), n
    assert torch.equal(opt.state[ps["w"]]["exp_avg_sq"].codes, opt2.state[ps2["w"]]["exp_avg_sq"].codes)


def test_refused_under_deepspeed():
    with pytest.raises(ConfigError, match="optim.name"):
        load_config("tiny-cpu", ["optim.name=adamw8bit", "deepspeed.stage=2"])
