"""D-OPSD at 1024^2 in one process capped at 24 GiB (issue 15 item 4): Z-Image-Turbo 6B and FLUX.2 [klein] 9B.

    python bench/bench_24gb.py --out OUT/bench_24gb.json          (CUDA: scripts/device_check.sh, stage mem24)
    python bench/bench_24gb.py --cpu --out /tmp/bench_24gb.json   (the same code path on tiny models, no cap)

The cap: torch.cuda.set_per_process_memory_fraction(cap / the card's memory) before anything is allocated, so the
caching allocator raises torch.OutOfMemoryError past ``--cap-gib`` (the CUDA context, outside the allocator, is not
counted: a real 24 GB card holds it on top).

Each family runs its preset, read through the trainer's own planning (load_config + resolve_plan, no weights):
  zimage   configs/zimage-turbo-lora-24gb.yaml: the 6B architecture, LoRA r64 / alpha 128 on attention q/k/v/out and
           feed_forward w1/w2/w3, K = 4 at sigma 1, .9, .75, .5, checkpointing full, bf16; contexts at the preset's
           maxima (the worst case): 512 student text tokens, 1024 teacher tokens
  klein9b  configs/flux2-klein-9b-lora.yaml: the 9B architecture, LoRA r64 / alpha 128 on the double blocks'
           8 attention projections, klein's K = 4 schedule at 1024^2, checkpointing full, bf16; 512 text rows for
           both roles (klein's encoder keeps the pads) and the teacher's 4096-token reference latent
at data.image_size 1024, with random weights (bench_e2e.random_model, one copy, built on the device under the cap)
and bench_e2e's ``Ours`` iteration (dopsd_step with per-step backward, clip, AdamW on fp32 adapters, EMA teacher;
ops auto on CUDA, the reference ops on CPU). ``--configs``: FAMILY-BASE in order, BASE bf16 (model.dtype as loaded)
or fp8 (model.base_precision=fp8: quantize_base on the LoRA linears, in place, after the family's bf16 runs; the
preset's fp8_input_grad); a trailing "?" runs it only when the family's bf16 did not fit (default: klein9b-fp8?,
whose FP8 part is only the 64 adapted linears, ~1.1 of the 9.1 B parameters).

Each configuration starts from one snapshot (adapters, EMA teacher, empty AdamW state; the snapshot on the host, off
the capped GPU) and runs ``--iterations`` iterations: the first is warm-up (Triton compiles, AdamW creates its state;
not timed, its memory counted), it/s is 1 / the median of the others. Peak = torch.cuda.max_memory_allocated and
max_memory_reserved over all of them; resident = unique bytes of the weights, adapters, AdamW state and EMA master;
alloc_retries = the allocator's cudaMalloc retries (cache flushed to stay under the cap: a sign of running close).
An OOM is a result, not a crash: status "does not fit", then the cap is lifted for ``--need-iterations`` iterations
that measure what the configuration needs ("does not fit at 24 GiB: needs X GiB"), and put back. Past
``--deadline`` (unix seconds) no further iteration starts: a configuration keeps the iterations it ran ("cut
short"), later ones are "skipped". The JSON is rewritten after every configuration, so a killed run keeps what
finished. Exit status 1 only when a configuration failed otherwise ("error").
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import Case, Config, Ours, random_model  # noqa: E402  (bench/ on the path, as pytest puts it)

from dopsd_fast.models.flux2_klein import ReferenceCondition  # noqa: E402
from dopsd_fast.nn.lora_linear import LoRALinear, quantize_base  # noqa: E402
from dopsd_fast.train.build import resolve_plan  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.memory import unique_bytes  # noqa: E402

GiB = 2**30
PRESETS = {"zimage": "zimage-turbo-lora-24gb", "klein9b": "flux2-klein-9b-lora"}
DEFAULT_CONFIGS = "zimage-bf16 zimage-fp8 klein9b-bf16 klein9b-fp8?"
# --cpu: the same presets shrunk to a few thousand parameters and a few tokens (the code path, not the numbers)
SMOKE = {
    "zimage": ["model.pretrained=null", "data.image_size=128", "adapter.rank=4", "adapter.alpha=8",
               "context.max_text_tokens=7", "context.teacher_max_tokens=20",
               "model.arch={dim: 64, n_layers: 2, n_refiner_layers: 1, n_heads: 2, n_kv_heads: 2, cap_feat_dim: 32, "
               "axes_dims: [8, 12, 12], axes_lens: [256, 64, 64]}"],
    "klein9b": ["model.pretrained=null", "data.image_size=64", "adapter.rank=4", "adapter.alpha=8",
                "context.max_text_tokens=7",
                "model.arch={num_layers: 1, num_single_layers: 2, num_attention_heads: 2, attention_head_dim: 16, "
                "joint_attention_dim: 32, axes_dims_rope: [4, 4, 4, 4]}"],
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def setting(family: str, device: str) -> dict:
    """The preset's model, recipe and context sizes as the trainer plans them (no weights read)."""
    cfg = load_config(PRESETS[family], SMOKE[family] if device == "cpu" else [])
    plan = resolve_plan(cfg, need_weights=False)
    ctx = cfg.context
    reference = ctx.teacher == "reference"
    tokens = (ctx.max_text_tokens, ctx.max_text_tokens if reference else ctx.teacher_max_tokens)
    case = Case(device, plan.arch, tuple(plan.family.latent_shape(cfg, plan.arch)), tokens, cfg.adapter.rank,
                DTYPES[cfg.model.dtype], rounds=1)
    return {"cfg": cfg, "plan": plan, "case": case, "reference": reference,
            "text_dim": plan.family.text_dim(plan.arch)}


def contexts(s: dict) -> tuple[list, list]:
    """Random features at the preset's sizes: c_s text; c_t text (Z-Image's teacher VLM tokens) or, for klein's
    reference teacher, text + the clean target latent as reference tokens."""
    case, g = s["case"], torch.Generator().manual_seed(1)

    def rows(n: int) -> torch.Tensor:
        return torch.randn(n, s["text_dim"], generator=g).to(case.device, case.dtype)
    c_s = [rows(case.caption_tokens[0])]
    if s["reference"]:
        ref = torch.randn(case.latent, generator=g).to(case.device, case.dtype)
        return c_s, [ReferenceCondition(rows(case.caption_tokens[1]), [ref])]
    return c_s, [rows(case.caption_tokens[1])]


def parse_configs(text: str) -> list[tuple[str, str, bool]]:
    """"zimage-bf16 klein9b-fp8?" -> [(family, base, only_if_bf16_did_not_fit)]; ValueError names a bad entry."""
    out = []
    for item in text.split():
        family, _, base = item.rstrip("?").rpartition("-")
        if family not in PRESETS or base not in ("bf16", "fp8"):
            raise ValueError(f"--configs: {item!r}: expected FAMILY-BASE[?] with FAMILY one of {', '.join(PRESETS)} "
                             "and BASE bf16 or fp8")
        out.append((family, base, item.endswith("?")))
    return out


class Capped:
    """The device side: the cap, memory readings and the cleanup after an OOM (no-ops on CPU)."""

    def __init__(self, device: str, cap_gib: float):
        self.cuda = device == "cuda"
        self.cap_gib = cap_gib
        self.card = torch.cuda.get_device_properties(0).total_memory if self.cuda else None
        self.fraction = min(1.0, cap_gib * GiB / self.card) if self.cuda else None
        self.capped(True)

    def capped(self, on: bool) -> None:
        if self.cuda:
            torch.cuda.set_per_process_memory_fraction(self.fraction if on else 1.0)
            self.release()

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.release()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> tuple[float | None, float | None]:
        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def retries(self) -> int | None:
        """cudaMalloc retries so far: the allocator freed its cache to stay under the cap (slow, near the limit)."""
        return torch.cuda.memory_stats().get("num_alloc_retries", 0) if self.cuda else None


def clear_grads(ours: Ours) -> None:
    """After an iteration cut short by an OOM: no gradient or graph may survive into the next run."""
    ours.optimizer.zero_grad(set_to_none=True)
    for t in ours.trained():
        t.grad = None


def iterate(ours: Ours, s: dict, ctx, n: int, dev: Capped, deadline: float, ops: str):
    """Up to n iterations from the snapshot: (seconds per iteration, losses per iteration, stopped by the deadline)."""
    config = Config("ours", s["cfg"].model.checkpointing, ops)
    ours.restore()
    noise = torch.Generator().manual_seed(2)
    seconds, losses = [], []
    for _ in range(n):
        if time.time() > deadline:
            return seconds, losses, True
        dev.sync()
        tic = time.perf_counter()
        out, _ = ours.iteration(config, *ctx, s["case"].latent, noise)
        dev.sync()
        seconds.append(time.perf_counter() - tic)
        losses.append(out)
    return seconds, losses, False


def run_config(ours: Ours, s: dict, ctx, name: str, base: str, a, dev: Capped, ops: str) -> dict:
    case, cfg = s["case"], s["cfg"]
    rec = {"name": name, "family": cfg.model.family, "preset": PRESETS[name.split("-")[0]], "base_precision": base,
           "checkpointing": cfg.model.checkpointing, "dtype": cfg.model.dtype, "rank": case.rank,
           "alpha": cfg.adapter.alpha, "lora_modules": len(ours.roles.targets), "sigmas": ours.sigmas,
           "image_size": cfg.data.image_size, "latent": list(case.latent),
           "context_tokens": {"student": case.caption_tokens[0], "teacher": case.caption_tokens[1],
                              "teacher_reference_latent": s["reference"]},
           "ops_backend": ops, "cap_gib": a.cap_gib if dev.cuda else None, "iterations_asked": a.iterations}
    if base == "fp8":
        rec["fp8_input_grad"] = cfg.model.fp8_input_grad
    dev.reset_peak()
    retries = dev.retries()
    oom = None
    try:
        seconds, losses, cut = iterate(ours, s, ctx, a.iterations, dev, a.deadline, ops)
    except torch.OutOfMemoryError as err:
        oom = str(err).splitlines()[0][:400]     # only the text: the traceback's frames hold the iteration's tensors
    if oom is not None:
        clear_grads(ours)
        dev.release()
        alloc, reserved = dev.peaks()
        rec.update(status="does not fit", why=oom, peak_allocated_gib_at_oom=alloc, peak_reserved_gib_at_oom=reserved)
        rec.update(needs(ours, s, ctx, a, dev, ops))
        need = rec.get("needs_allocated_gib")
        rec["verdict"] = (f"does not fit at {a.cap_gib:g} GiB: needs {need:.2f} GiB allocated "
                          f"({rec['needs_reserved_gib']:.2f} reserved)" if need is not None else
                          f"does not fit at {a.cap_gib:g} GiB: {rec.get('needs_why', 'needs more')}")
        return rec
    alloc, reserved = dev.peaks()
    timed = seconds[1:]
    rec.update(iterations=len(seconds), seconds=seconds, losses=losses,
               finite_losses=all(math.isfinite(v) for it in losses for v in it),
               peak_allocated_gib=alloc, peak_reserved_gib=reserved,
               alloc_retries=None if retries is None else dev.retries() - retries,
               resident_gib=unique_bytes(ours.resident()) / GiB,
               weights_gib=unique_bytes(list(ours.roles.model.parameters())) / GiB,
               it_per_s=1 / statistics.median(timed) if timed else None)
    if not seconds:
        rec.update(status="skipped", verdict="skipped: out of time before its first iteration")
        return rec
    rec["status"] = "cut short" if cut else "fits"
    where = f"at {a.cap_gib:g} GiB" if dev.cuda else "(CPU, no cap)"
    speed = f"{rec['it_per_s']:.3f} it/s" if timed else "not timed"
    peak = f"peak {alloc:.2f} GiB allocated / {reserved:.2f} reserved" if dev.cuda else "peak not measured on CPU"
    rec["verdict"] = (f"{'fits' if not cut else 'ran'} {where}: {len(seconds)} iterations"
                      f"{' (cut short by the stage deadline)' if cut else ''}, {peak}, {speed}"
                      + ("" if rec["finite_losses"] else ", NON-FINITE LOSSES"))
    return rec


def needs(ours: Ours, s: dict, ctx, a, dev: Capped, ops: str) -> dict:
    """The cap lifted: what the configuration allocates in ``a.need_iterations`` iterations, then the cap back."""
    if not dev.cuda:
        return {"needs_why": "no cap on CPU"}
    if time.time() + 30 > a.deadline:
        return {"needs_why": "not measured: out of time"}
    dev.capped(False)
    dev.reset_peak()
    try:
        iterate(ours, s, ctx, a.need_iterations, dev, math.inf, ops)
        alloc, reserved = dev.peaks()
        result = {"needs_allocated_gib": alloc, "needs_reserved_gib": reserved, "needs_iterations": a.need_iterations}
    except torch.OutOfMemoryError as err:
        result = {"needs_why": f"more than the whole card ({dev.card / GiB:.1f} GiB): {str(err).splitlines()[0][:200]}"}
    clear_grads(ours)
    dev.capped(True)        # releases the cache: the next configuration starts under the cap again
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny models on the CPU, no cap: the code path only")
    p.add_argument("--cap-gib", type=float, default=24.0, help="per-process cap of the CUDA caching allocator")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="FAMILY-BASE[?] in order (see the module doc)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per configuration (CUDA 10, --cpu 3)")
    p.add_argument("--need-iterations", type=int, default=2, help="uncapped iterations that measure an OOM's need")
    p.add_argument("--deadline", type=float, default=math.inf, help="unix seconds: no iteration starts after it")
    p.add_argument("--out", type=Path, required=True, help="JSON file, rewritten after every configuration")
    a = p.parse_args(argv)
    device = "cpu" if a.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped (--cpu runs the code path on tiny models)")
        return 0
    a.iterations = a.iterations or (3 if a.cpu else 10)
    try:
        todo = parse_configs(a.configs)
    except ValueError as err:
        p.error(str(err))
    dev = Capped(device, a.cap_gib)              # first, before anything is allocated on the device
    ops = "auto" if dev.cuda else "reference"    # not Triton's interpreter (device_check --cpu sets TRITON_INTERPRET)
    report = {"device": torch.cuda.get_device_name() if dev.cuda else platform.processor() or "cpu",
              "card_gib": dev.card / GiB if dev.cuda else None, "cap_gib": a.cap_gib if dev.cuda else None,
              "cap_fraction": dev.fraction, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "iterations": a.iterations, "runs": [], "summary": []}

    def write() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")

    def record(rec: dict) -> None:
        report["runs"].append(rec)
        report["summary"].append(f"{rec['name']}: {rec['verdict']}")
        print(report["summary"][-1], flush=True)
        write()

    failed = False
    for family in dict.fromkeys(f for f, _, _ in todo):     # one build per family, in the order named
        wanted = [(f"{family}-{b}", b, cond) for f, b, cond in todo if f == family]
        if time.time() > a.deadline:
            for name, _, _ in wanted:
                record({"name": name, "status": "skipped", "verdict": "skipped: out of time"})
            continue
        ours = None
        try:
            s = setting(family, device)
            tic = time.perf_counter()
            ours = Ours(random_model(s["case"]), s["case"], targets=s["cfg"].adapter.targets,
                        sigmas=s["plan"].sigmas, alpha=s["cfg"].adapter.alpha)
            ours.snapshot("cpu")
            ctx = contexts(s)
            print(f"{family}: {PRESETS[family]}, {s['plan'].total_params / 1e6:,.1f} M parameters, built in "
                  f"{time.perf_counter() - tic:.1f} s", flush=True)
            fits_bf16 = None
            for name, base, only_if_needed in wanted:
                if only_if_needed and fits_bf16:
                    record({"name": name, "status": "not needed",
                            "verdict": f"not run: {family}-bf16 fits (run it by naming {name} without '?')"})
                    continue
                if time.time() > a.deadline:
                    record({"name": name, "status": "skipped", "verdict": "skipped: out of time"})
                    continue
                if base == "fp8" and not any(isinstance(m, LoRALinear) and m.weight_scale is not None
                                             for m in ours.roles.model.modules()):
                    quantize_base(ours.roles.model, s["cfg"].model.fp8_input_grad)
                    dev.release()
                elif base == "bf16" and any(isinstance(m, LoRALinear) and m.weight_scale is not None
                                            for m in ours.roles.model.modules()):
                    raise ValueError(f"--configs: {name} after {family}-fp8: quantising is one-way, name bf16 first")
                rec = run_config(ours, s, ctx, name, base, a, dev, ops)
                if base == "bf16":
                    fits_bf16 = rec["status"] in ("fits", "cut short")
                record(rec)
        except torch.OutOfMemoryError as err:        # the build itself (weights alone over the cap)
            record({"name": f"{family} (build)", "status": "does not fit",
                    "verdict": f"does not fit at {a.cap_gib:g} GiB: the model's build ran out of memory "
                               f"({str(err).splitlines()[0][:200]})"})
        except Exception as err:                     # noqa: BLE001 (recorded; the exit status says it)
            failed = True
            record({"name": family, "status": "error", "verdict": f"error: {type(err).__name__}: {err}"[:600]})
        finally:
            del ours
            dev.release()
    write()
    print("wrote", a.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
