"""Step-distil the world's base into a 4-step turbo by trajectory-segment regression, then assemble the assets.

    python scripts/world_distill.py --pretrained outputs/world-pretrain/step-002000 --out dopsd_fast/world/assets

The teacher is the base with classifier-free guidance on the 16-step shift-3 grid; its states at the 4-step
grid sigma = 1, .9, .75, .5 -> 0 (points 0, 4, 8, 12, 16 of the 16-step grid) are recorded, and the turbo
(initialised from the base) learns, from each recorded state, the mean velocity that lands on the next one.
Prompts follow the pretraining mixture (text only, unknown-word and null captions, related-image contexts),
so the turbo also samples under-specified prompts and in-context prompts well in 4 steps.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

from dopsd_fast.method.schedule import Z_IMAGE, shifted_sigmas
from dopsd_fast.world.bundle import load_dit, load_encoders, save_dit, sha256, update_manifest
from dopsd_fast.world.data import draw
from dopsd_fast.world.scene import SIZE

GRID = 16
KEEP = (0, 4, 8, 12, 16)          # the 4-step schedule inside the 16-step one


@torch.no_grad()
def teacher_states(base, enc, d, cfg_scale: float, g: torch.Generator) -> tuple[torch.Tensor, list]:
    """(B, 5, 3, 1, S, S) states of the guided teacher at the KEEP points, and the context features."""
    sigmas = shifted_sigmas(GRID, 3.0)
    n = len(d.prompts)
    cond, null = enc(d.prompts, d.refs), enc([""] * n)
    ctx_c, ctx_u = base.encode_context(cond), base.encode_context(null)
    x = torch.randn(n, 3, 1, SIZE, SIZE, generator=g)
    kept = [x]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = Z_IMAGE.time(torch.full((n,), s))
        vc = torch.stack(base(list(x), t, context=ctx_c))
        vu = torch.stack(base(list(x), t, context=ctx_u))
        x = Z_IMAGE.euler(x, vu + cfg_scale * (vc - vu), s, s_next)
        if i + 1 in KEEP:
            kept.append(x)
    return torch.stack(kept, 1), cond


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pretrained", required=True, help="a world_pretrain snapshot folder (base/, encoders.safetensors)")
    p.add_argument("--out", default="dopsd_fast/world/assets")
    p.add_argument("--trajectories", type=int, default=1024)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(1)
    src, out = Path(a.pretrained), Path(a.out)
    base, enc = load_dit("base", src), load_encoders(src)
    rng, g = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    states, feats = [], []
    for start in range(0, a.trajectories, 128):
        d = draw(rng, min(128, a.trajectories - start), p_ref=0.3, p_null=0.1, p_nonce=0.25)
        st, c = teacher_states(base, enc, d, a.cfg, g)
        states.append(st)
        feats += c
        print(f"trajectories {start + len(c)}/{a.trajectories}", flush=True)
    states = torch.cat(states)
    sig = torch.tensor(shifted_sigmas(4, 3.0))

    torch.manual_seed(a.seed)
    turbo = load_dit("base", src).requires_grad_(True).train()
    params = list(turbo.parameters())
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(1, a.steps + 1):
        idx = torch.randint(len(states), (a.batch,), generator=g)
        k = torch.randint(4, (a.batch,), generator=g)
        x, x_next = states[idx, k], states[idx, k + 1]
        target = (x_next - x) / (sig[k] - sig[k + 1]).view(-1, 1, 1, 1, 1)      # mean velocity over the segment
        pred = torch.stack(turbo(list(x), Z_IMAGE.time(sig[k]), cap_feats=[feats[i] for i in idx.tolist()]))
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - a.ema)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)

    hashes = {"turbo": save_dit(turbo, out / "turbo")}
    if src.resolve() != out.resolve():
        shutil.copytree(src / "base", out / "base", dirs_exist_ok=True)
        shutil.copy(src / "encoders.safetensors", out / "encoders.safetensors")
    hashes["base"] = sha256(out / "base" / "diffusion_pytorch_model.safetensors")
    hashes["encoders"] = sha256(out / "encoders.safetensors")
    update_manifest(out, "distill", {"script": "scripts/world_distill.py", "args": vars(a), "sha256": hashes})
    # The snapshot at step N of a constant-lr run equals `world_pretrain.py --steps N` with the same args.
    pre_args = json.loads((src.parent / "args.json").read_text())
    pre_args["steps"] = int(src.name.split("-")[-1])
    update_manifest(out, "pretrain", {"script": "scripts/world_pretrain.py", "args": pre_args,
                                      "sha256": {"base": hashes["base"], "encoders": hashes["encoders"]}})


if __name__ == "__main__":
    main()
