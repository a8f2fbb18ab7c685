"""End-to-end D-OPSD iterations: dopsd_fast vs the authors' released loop (bench/baselines/released_loop.py).

Both sides get the same model config, base weights, LoRA weights, contexts and noise seed, and the same recipe
(LoRA on attention q/k/v/out + feed_forward w1/w2/w3, K = 4, sigma 1, .9, .75, .5 -> 0, x0 loss, AdamW, clip 1.0,
EMA teacher, gradient checkpointing on; ``-nockpt`` cases run ours without it, the baseline still with it), and the
same master-weight policy: fp32 trainable LoRA weights and AdamW state, compute in the model's dtype (the baseline as
DeepSpeed's bf16 optimizer runs the released recipe: fp32 masters of its bf16 PEFT adapter). Ours:
packed model, caption path once per iteration, per-step backward,
fused ops on CUDA (the PyTorch reference ops on CPU, bench/conftest.py). Runs alternate, baseline then ours, so
machine noise hits both; pytest-benchmark times ours, the baseline is timed in the round's setup, and extra_info
holds it/s, images/s, the per-round speed ratio (min/median/max), memory and MFU of both.

Memory is what one iteration needs: ``resident`` = unique bytes of parameters, optimizer state and EMA master held
between iterations; ``transient`` = the highest bytes allocated during an iteration above what was live at its
start (activations, gradients, temporaries). CUDA reads the caching allocator (max_memory_allocated); CPU records
every tensor allocation and free of one iteration with the torch profiler (profile_memory) and takes the running
peak. ``peak`` = resident + transient, per side (the other side's model is not counted).

Sizes: CPU a small Z-Image (fp32); CUDA the real Z-Image-Turbo 6B architecture with random bf16 weights at 512^2
and 1024^2, LoRA r64, batch 1. Under --benchmark-disable (CI) each case runs once at a tiny size; DOPSD_BENCH_SMOKE=1
times that tiny size (scripts/device_check.sh --cpu).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import pytest
import torch
from baselines.released_loop import ReleasedLoop, diffusers_transformer

from dopsd_fast.method.roles import LoRARoles
from dopsd_fast.method.schedule import Z_IMAGE, rollout_sigmas
from dopsd_fast.method.step import dopsd_step
from dopsd_fast.metrics.flops import dopsd_iteration, verl_omni_iteration, zimage_layout
from dopsd_fast.models.checkpointing import CheckpointPlan
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.train.memory import optimizer_tensors, unique_bytes
from dopsd_fast.train.telemetry import peak_tflops

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
SIGMAS = [1.0, 0.9, 0.75, 0.5]
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
GRAD_CLIP, EMA_DECAY = 1.0, 0.9999


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    arch: ZImageConfig
    latent: tuple[int, int, int, int]     # (C, F, H, W)
    caption_tokens: tuple[int, int]       # real tokens of c_s (text) and c_t (text + target image)
    rank: int
    dtype: torch.dtype
    rounds: int
    # The baseline always checkpoints (the released recipe: it holds K graphs until one backward). Ours holds one
    # step's graph, so it can afford to skip checkpointing: the "-nockpt" cases trade memory for the recompute.
    ours_checkpointing: bool = True


SMALL = ZImageConfig(dim=256, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=128,
                     axes_dims=(16, 24, 24), axes_lens=(512, 64, 64))
TINY = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                    axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
# c_t: the teacher's VLM sees the target resized into [512^2, 768^2] pixels, (H/32)(W/32) image tokens (256 for a
# 512^2 crop, 576 for 1024^2), plus the prompt's ~128 (method.md section 6)
CASES = {
    "cpu-small": Case("cpu", SMALL, (16, 1, 32, 32), (40, 90), 16, torch.float32, 5),
    "cuda-6b-512": Case("cuda", ZImageConfig(), (16, 1, 64, 64), (128, 384), 64, torch.bfloat16, 5),
    "cuda-6b-1024": Case("cuda", ZImageConfig(), (16, 1, 128, 128), (128, 704), 64, torch.bfloat16, 3),
}
CASES.update({f"{name}-nockpt": dataclasses.replace(case, ours_checkpointing=False) for name, case in list(CASES.items())})
SMOKE = Case("cpu", TINY, (16, 1, 16, 16), (7, 20), 4, torch.float32, 1)


# ---------------------------------------------------------------------------------------------- building
@torch.no_grad()
def randomize_base(model: torch.nn.Module, seed: int) -> None:
    """Random weights at a sane scale: unit-variance linear outputs, norms near 1, small biases and pads."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.dim() >= 2 and "pad_token" not in name:
            p.copy_(noise / math.sqrt(p.shape[1]))
        elif "norm" in name or name.startswith("cap_embedder.0"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


class Ours:
    """dopsd_fast's iteration, as Trainer.forward_backward_step + optimizer_step run it (device-placed here)."""

    def __init__(self, base_state: dict, case: Case):
        with torch.device("meta"):
            model = ZImageTransformer(case.arch)
        model = model.to(case.dtype).to_empty(device=case.device)
        model.load_state_dict(base_state, strict=True)
        model.checkpointing = CheckpointPlan("full" if case.ours_checkpointing else "none")
        self.roles = LoRARoles(model, TARGETS, case.rank, 2.0 * case.rank)
        self.optimizer = torch.optim.AdamW(self.roles.trainable.values(), **OPTIM)
        self.sigmas, self.case = rollout_sigmas(SIGMAS), case

    def iteration(self, c_s, c_t, generator) -> list[float]:
        out = dopsd_step(self.roles, Z_IMAGE, c_s, c_t, [self.case.latent], self.sigmas, "x0", True, generator,
                         self.case.dtype)
        torch.nn.utils.clip_grad_norm_(list(self.roles.trainable.values()), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.roles.update_teacher(EMA_DECAY)
        return out.losses

    def resident(self) -> list[torch.Tensor]:
        return [*self.roles.model.parameters(), *optimizer_tensors(self.optimizer), *self.roles.ema.master]


class Baseline:
    def __init__(self, model, case: Case):
        self.loop = ReleasedLoop(model, targets=TARGETS, rank=case.rank, alpha=2.0 * case.rank, sigmas=SIGMAS,
                                 grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, **OPTIM)
        self.case = case

    def iteration(self, c_s, c_t, generator) -> list[float]:
        return self.loop.iteration(c_s, c_t, self.case.latent, 1, generator)

    def resident(self) -> list[torch.Tensor]:
        return [*self.loop.model.parameters(), *(self.loop.masters or []), *optimizer_tensors(self.loop.optimizer)]


def build(case: Case):
    torch.manual_seed(0)      # our LoRA init; PEFT's is overwritten with it below
    theirs = diffusers_transformer(case.arch, case.device, case.dtype)
    randomize_base(theirs, seed=0)
    ours = Ours(theirs.state_dict(), case)
    baseline = Baseline(theirs, case)
    # identical adapters on both sides
    baseline.loop.load_adapters(dict(ours.roles.trainable), dict(zip(ours.roles.ema.names, ours.roles.ema.teacher)))
    g = torch.Generator().manual_seed(1)
    c_s, c_t = (torch.randn(n, case.arch.cap_feat_dim, generator=g).to(case.device, case.dtype)
                for n in case.caption_tokens)
    return ours, baseline, [c_s], [c_t]


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def transient_bytes(run, device: str) -> int:
    """Highest bytes allocated during ``run()`` above what was live when it started."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu":
                events.append((n.start_time_ns, n.extra_fields.alloc_size))   # negative for a free
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def peak_flops(device: str) -> tuple[float, str]:
    """(FLOP/s the MFU is relative to, what it is)."""
    if device == "cuda":
        name, peak = torch.cuda.get_device_name(), peak_tflops(None)
        return (peak * 1e12, f"{name} dense bf16 peak") if peak else (float("nan"), f"{name}: no peak on record")
    a = torch.randn(1024, 1024)
    best = min(_timed(lambda: a @ a, device) for _ in range(5))
    return 2 * 1024**3 / best, "measured fp32 1024^3 matmul rate on this CPU"


def _timed(fn, device: str) -> float:
    sync(device)
    tic = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - tic


# ---------------------------------------------------------------------------------------------- the bench
@pytest.mark.benchmark(group="dopsd_e2e")
@pytest.mark.parametrize("size", list(CASES))
def test_e2e(benchmark, size):
    case = CASES[size]
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if case.device == "cpu" and torch.cuda.is_available():
        pytest.skip("the GPU machine runs the GPU sizes")
    if benchmark.disabled or os.environ.get("DOPSD_BENCH_SMOKE") == "1":
        case = dataclasses.replace(SMOKE, ours_checkpointing=case.ours_checkpointing)
    ours, baseline, c_s, c_t = build(case)

    # same seed, same first roll-out: the losses agree (to bf16 rounding on CUDA)
    losses = {name: side.iteration(c_s, c_t, torch.Generator().manual_seed(30))
              for name, side in (("baseline", baseline), ("ours", ours))}
    gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["ours"], losses["baseline"]))
    benchmark.extra_info["first_losses"] = losses
    benchmark.extra_info["first_losses_max_rel_diff"] = gap

    noise = {"ours": torch.Generator().manual_seed(31), "baseline": torch.Generator().manual_seed(31)}
    memory = {}
    for name, side in (("baseline", baseline), ("ours", ours)):
        transient = transient_bytes(lambda: side.iteration(c_s, c_t, noise[name]), case.device)
        resident = unique_bytes(side.resident())
        memory[name] = {"resident_bytes": resident, "transient_bytes": transient, "peak_bytes": resident + transient}

    base_times: list[float] = []
    ours_times: list[float] = []

    def baseline_round():
        base_times.append(_timed(lambda: baseline.iteration(c_s, c_t, noise["baseline"]), case.device))

    def ours_round():
        ours_times.append(_timed(lambda: ours.iteration(c_s, c_t, noise["ours"]), case.device))

    benchmark.pedantic(ours_round, setup=baseline_round, rounds=case.rounds, warmup_rounds=0)

    ratios = [b / o for b, o in zip(base_times, ours_times)]
    image_tokens = case.latent[-1] // 2 * (case.latent[-2] // 2)
    student, teacher = (zimage_layout(case.arch, image_tokens, n) for n in case.caption_tokens)
    adapters = (case.rank, ours.roles.targets)        # the baseline's PEFT adapters sit on the same linears
    peak, peak_note = peak_flops(case.device)
    info = {"case": size if case is CASES[size] else f"smoke ({size})", "device": _device_name(case.device),
            "ours_gradient_checkpointing": case.ours_checkpointing, "baseline_gradient_checkpointing": True,
            "threads": torch.get_num_threads(), "mfu_reference": peak_note}
    for name, times in (("baseline", base_times), ("ours", ours_times)):
        # each side's own work: ours runs the caption refiner once per role, the baseline in every forward
        per_step = name == "baseline"
        flops = dopsd_iteration(teacher, student, len(SIGMAS), adapters, context_per_step=per_step).total
        flops_verl = verl_omni_iteration(teacher, student, len(SIGMAS), context_per_step=per_step).total
        med = statistics.median(times)
        info[name] = {"it_per_s": 1 / med, "images_per_s": 1 / med, "seconds": times,
                      "model_flops_per_iteration": flops, "model_flops_per_iteration_verl_omni": flops_verl,
                      "mfu": flops / med / peak, "mfu_verl_omni": flops_verl / med / peak, **memory[name]}
    info["speedup_min_median_max"] = [min(ratios), statistics.median(ratios), max(ratios)]
    info["peak_memory_ratio_ours_over_baseline"] = memory["ours"]["peak_bytes"] / memory["baseline"]["peak_bytes"]
    info["transient_memory_ratio_ours_over_baseline"] = (memory["ours"]["transient_bytes"]
                                                         / max(memory["baseline"]["transient_bytes"], 1))
    benchmark.extra_info.update(info)
    print(f"\n{info['case']} on {info['device']}: ours {info['ours']['it_per_s']:.3f} it/s vs baseline "
          f"{info['baseline']['it_per_s']:.3f} it/s, speedup min/median/max "
          + "/".join(f"{r:.2f}" for r in info["speedup_min_median_max"])
          + f"; peak memory ours/baseline {info['peak_memory_ratio_ours_over_baseline']:.2f} "
          f"(transient {info['transient_memory_ratio_ours_over_baseline']:.2f}); "
          f"MFU ours {info['ours']['mfu']:.1%} baseline {info['baseline']['mfu']:.1%}; first-loss gap {gap:.1e}")
    ours = baseline = None      # the rounds' closures hold these cells: free both models before the next size
    if case.device == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
