"""FP8 frozen base vs bf16 (issue 15 items 3 and 5): op error, model x0 error, and (CUDA) iteration speed.

    python bench/bench_fp8.py --device cpu --blocks 2 --size 256 --tokens 1024 --out results/fp8/FILE.json
    python bench/bench_fp8.py --device cuda --out OUT/bench_fp8.json        (scripts/device_check.sh, stage fp8)

op     every distinct shape of the 6B's LoRA-target linears (to_q/k/v/out 3840->3840, w1/w3 3840->10240, w2
       10240->3840) on ``--tokens`` rows of activations, Gaussian and Gaussian with 1% of the channels x20 (trained
       transformers have such outlier features; random weights do not); weights N(0, 1/in); both rounded to bf16.
       Relative error ||Y - Y32|| / ||Y32|| (Frobenius) vs the fp32 product of the same bf16 values: the bf16 GEMM's
       and the FP8 base's (fp8_linear: the CPU emulation, or torch._scaled_mm on CUDA sm89+).
x0     the 6B architecture at full width (dim 3840, 30 heads, 2 + 2 refiners, ``--blocks`` main blocks: 30 on CUDA),
       random weights (testing.randomize_weights), one ``--size``^2 latent and a 128-token caption. x0 = x_s + s * out
       at the roll-out sigmas 1, .9, .75, .5 from one noise draw; relative error vs the same model in fp32 of the
       model in bf16 (model.base_precision=bf16) and of that bf16 model with its LoRA-target linears quantised
       (base_precision=fp8; adapters off, i.e. B = 0 as at the start of training).
speed  bench_e2e's ``Ours`` iteration (D-OPSD, K = 4, LoRA r64, AdamW, EMA) at its cuda-6b-1024 case,
       checkpointing full and none, for the bf16 base, then the same model quantised with fp8_input_grad bf16, then
       e5m2 (quantising is one-way, so the three run in that order, not interleaved); each restores the adapters,
       runs one warm-up and ``--rounds`` timed iterations: median seconds, peak memory, the first iteration's losses.
       On CPU its tiny smoke case instead (``--parts speed`` there checks the path; the emulation's times mean nothing).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dopsd_fast.method.schedule import Z_IMAGE
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.nn.lora_linear import LoRALinear, inject_lora, quantize_base, set_active_adapter
from dopsd_fast.ops.fp8_linear import fp8_linear
from dopsd_fast.ops.reference import quantize_rowwise
from dopsd_fast.testing import randomize_weights

SIGMAS = [1.0, 0.9, 0.75, 0.5]
TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
OP_SHAPES = {"attention.to_q/k/v/out": (3840, 3840), "feed_forward.w1/w3": (3840, 10240),
             "feed_forward.w2": (10240, 3840)}
CAPTION_TOKENS = 128


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@torch.no_grad()
def op_errors(device: str, tokens: int) -> list[dict]:
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for name, (n_in, n_out) in OP_SHAPES.items():
        w = (torch.randn(n_out, n_in, generator=g, device=device) / n_in ** 0.5).bfloat16()
        wq, ws = quantize_rowwise(w)
        for acts in ("gaussian", "outlier channels"):
            x = torch.randn(tokens, n_in, generator=g, device=device)
            if acts == "outlier channels":
                x[:, torch.randperm(n_in, generator=g, device=device)[: n_in // 100]] *= 20
            x = x.bfloat16()
            y32 = x.float() @ w.float().t()
            rows.append({"linear": name, "in": n_in, "out": n_out, "tokens": tokens, "activations": acts,
                         "bf16": rel(x @ w.t(), y32), "fp8": rel(fp8_linear(x, wq, ws), y32)})
            print(f"op {name:24s} {acts:17s} rel. error bf16 {rows[-1]['bf16']:.2e}  fp8 {rows[-1]['fp8']:.2e}")
    return rows


@torch.no_grad()
def x0_errors(device: str, blocks: int, size: int) -> dict:
    arch = ZImageConfig(n_layers=blocks)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZImageTransformer(arch)
    model = randomize_weights(model.to_empty(device=device), seed=0).requires_grad_(False)   # a frozen base
    g = torch.Generator(device).manual_seed(1)
    latent = torch.randn(arch.in_channels, 1, size // 8, size // 8, generator=g, device=device)
    noise = torch.randn(latent.shape, generator=g, device=device)
    feats = torch.randn(CAPTION_TOKENS, arch.cap_feat_dim, generator=g, device=device)

    def predict(dtype) -> list[torch.Tensor]:
        ctx = model.encode_context([feats.to(dtype)])
        out = []
        for s in SIGMAS:
            x = ((1 - s) * latent + s * noise).to(dtype)
            pred = model([x], Z_IMAGE.time(torch.tensor([s], device=device)), context=ctx)[0]
            out.append(Z_IMAGE.to_x0(x.float(), pred.float(), s))
        return out

    tic = time.perf_counter()
    ref = predict(torch.float32)
    model.to(torch.bfloat16)                                      # the bf16 model: what the trainer loads
    bf16 = predict(torch.bfloat16)
    inject_lora(model, TARGETS, ["student"], 1, 1.0)
    set_active_adapter(model, None)                               # the base alone (LoRA B = 0 at the start)
    quantized = quantize_base(model)
    fp8 = predict(torch.bfloat16)
    per_sigma = [{"sigma": s, "bf16": rel(b, r), "fp8": rel(f, r), "fp8_vs_bf16": rel(f, b)}
                 for s, r, b, f in zip(SIGMAS, ref, bf16, fp8)]
    for row in per_sigma:
        print(f"x0 sigma {row['sigma']:.2f}: rel. error vs fp32, bf16 {row['bf16']:.2e}  fp8 {row['fp8']:.2e}")
    return {"arch": {"dim": arch.dim, "n_heads": arch.n_heads, "n_layers": blocks,
                     "n_refiner_layers": arch.n_refiner_layers}, "image_size": size,
            "image_tokens": (size // 16) ** 2, "caption_tokens": CAPTION_TOKENS, "quantized_linears": quantized,
            "seconds": time.perf_counter() - tic, "per_sigma": per_sigma}


def speed(device: str, rounds: int) -> list[dict]:
    """bench_e2e's Ours iteration for bf16, fp8 (bf16 input grad), fp8 (e5m2): its cuda-6b-1024 case on CUDA, its
    tiny smoke case on CPU (the path checked, the times meaningless)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import CASES, SMOKE, Config, Ours

    case = CASES["cuda-6b-1024"] if device == "cuda" else SMOKE
    cuda = device == "cuda"
    ops = "auto" if cuda else "reference"       # not Triton's interpreter (TRITON_INTERPRET=1 in device_check --cpu)
    with torch.device("meta"):
        model = ZImageTransformer(case.arch)
    model = randomize_weights(model.to(case.dtype).to_empty(device=device), seed=0)
    ours = Ours(model.state_dict(), case)
    del model
    ours.snapshot()
    g = torch.Generator().manual_seed(1)
    c_s, c_t = ([torch.randn(n, case.arch.cap_feat_dim, generator=g).to(device, case.dtype)]
                for n in case.caption_tokens)
    runs = []
    for base in ("bf16", "fp8", "fp8-e5m2"):
        if base == "fp8":
            quantize_base(ours.roles.model, "bf16")
        for m in ours.roles.model.modules():
            if isinstance(m, LoRALinear) and m.weight_scale is not None:
                m.input_grad = "e5m2" if base == "fp8-e5m2" else "bf16"
        for ckpt in ("full", "none"):
            ours.restore()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds, losses = [], None
            for i in range(rounds + 1):
                if cuda:
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                out, _ = ours.iteration(Config("ours", ckpt, ops), c_s, c_t, case.latent,
                                        torch.Generator().manual_seed(2))   # host noise (dopsd_step)
                if cuda:
                    torch.cuda.synchronize()
                if i == 0:
                    losses = out
                else:
                    seconds.append(time.perf_counter() - tic)
            runs.append({"base": base, "checkpointing": ckpt, "median_s": statistics.median(seconds),
                         "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                         "first_losses": losses})
            print(f"speed {base:8s} ckpt={ckpt:4s} {1 / runs[-1]['median_s']:.3f} it/s  "
                  f"peak {runs[-1]['peak_gib'] or 0:.2f} GiB  losses {[round(v, 5) for v in losses]}")
    for r in runs:
        bf16 = next(b for b in runs if b["base"] == "bf16" and b["checkpointing"] == r["checkpointing"])
        r["speedup_vs_bf16"] = bf16["median_s"] / r["median_s"]
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=30, help="main transformer blocks of the x0 model (6B: 30)")
    p.add_argument("--size", type=int, default=1024, help="image side of the x0 model's latent")
    p.add_argument("--tokens", type=int, default=4224, help="activation rows of the op errors (1024^2: 4224)")
    p.add_argument("--rounds", type=int, default=3, help="timed iterations per speed configuration (CUDA)")
    p.add_argument("--parts", default="op x0 speed", help="any of: op x0 speed (on CPU: a tiny smoke case)")
    p.add_argument("--out", type=Path, required=True, help="JSON file")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped (run with --device cpu for the emulation's numbers)")
        return 0
    parts = a.parts.split()
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "fp8_path": "torch._scaled_mm" if a.device == "cuda" else "emulation",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    if "op" in parts:
        report["op"] = op_errors(a.device, a.tokens)
    if "x0" in parts:
        report["x0"] = x0_errors(a.device, a.blocks, a.size)
    if "speed" in parts:
        report["speed"] = speed(a.device, a.rounds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
