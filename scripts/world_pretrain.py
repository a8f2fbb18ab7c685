"""Pretrain the miniature world's base: flow matching of the Z-Image DiT on text-only and text + related-image
contexts, jointly with the tiny Qwen3 LM layers and the patch embedder (the word table stays frozen).

    python scripts/world_pretrain.py --out outputs/world-pretrain --steps 4000

Writes EMA snapshots <out>/step-NNNNNN/{base,encoders}.safetensors every --save-every steps and a loss log.
The learning rate is constant after warm-up, so the snapshot at step N equals a run with --steps N.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dopsd_fast.method.schedule import Z_IMAGE
from dopsd_fast.world.bundle import DIT_ARCH, build_dit, save_dit, save_module
from dopsd_fast.world.data import draw
from dopsd_fast.world.encoders import ENCODER_CONFIG, WorldEncoders


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="outputs/world-pretrain")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--shift", type=float, default=3.0, help="sigma = shift*u/(1+(shift-1)*u), u ~ U(0,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=250)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    dit, enc = build_dit(), WorldEncoders(seed=a.seed)
    params = [q for m in (dit, enc) for q in m.parameters() if q.requires_grad]
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng, noise = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    (out / "args.json").write_text(json.dumps({**vars(a), "dit_arch": DIT_ARCH, "encoder": ENCODER_CONFIG}, indent=1))
    log = open(out / "log.jsonl", "a")
    tic = time.time()
    for step in range(1, a.steps + 1):
        d = draw(rng, a.batch)
        x0 = torch.stack(d.images)[:, :, None]                        # (B, 3, 1, S, S)
        u = torch.rand(a.batch, generator=noise)
        sigma = a.shift * u / (1 + (a.shift - 1) * u)
        eps = torch.randn(x0.shape, generator=noise)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        feats = enc(d.prompts, d.refs)
        pred = torch.stack(dit(list(x_t), Z_IMAGE.time(sigma), cap_feats=feats))
        loss = torch.nn.functional.mse_loss(pred, Z_IMAGE.target(x0, eps))
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / a.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():       # warm-up EMA: early snapshots are not dominated by the random init
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - min(a.ema, (1 + step) / (10 + step)))
        log.write(json.dumps({"step": step, "loss": loss.item(), "sec": time.time() - tic}) + "\n")
        if step % 25 == 0:
            log.flush()
        if step % a.save_every == 0 or step == a.steps:
            snapshot(out / f"step-{step:06d}", dit, enc, params, ema)
    log.close()


def snapshot(folder: Path, dit, enc, params, ema) -> None:
    """Save the EMA weights (swapped in, then back)."""
    live = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)
        save_dit(dit, folder / "base")
        save_module(enc, folder / "encoders.safetensors")
        for q, v in zip(params, live):
            q.copy_(v)


if __name__ == "__main__":
    main()
