"""End-to-end D-OPSD iterations, dopsd_fast vs the authors' released loop (bench/baselines/released_loop.py), in every
configuration each side offers its user; per memory budget, the fastest configuration of each side that fits. A third
side, "patched", is the released loop with ``apply_dopsd_kernels`` called once on its diffusers model and nothing
else changed: what our ops alone give another trainer, and what our trainer adds on top.

Both sides get the same model config, base weights, LoRA weights, contexts and noise seed, and the same recipe
(LoRA on attention q/k/v/out + feed_forward w1/w2/w3, K = 4, sigma 1, .9, .75, .5 -> 0, x0 loss, AdamW, clip 1.0,
EMA teacher) and master-weight policy (fp32 trainable LoRA weights and AdamW state, compute in the model's dtype;
the baseline as DeepSpeed's bf16 optimizer runs the released recipe: fp32 masters of its bf16 PEFT adapter).

Configurations (``configurations``), all on one model per side, switched between iterations:
  baseline  gradient checkpointing on (the released recipe) | off (the script's flag: K graphs held until the one
            backward); on CUDA x SDPA restricted to FLASH | CUDNN | EFFICIENT (torch.nn.attention.sdpa_kernel; on
            CPU torch's own choice, "sdpa=default")
  ours      model.checkpointing full | selective | none (auto only chooses among these per budget, which the
            budget table does too); on CUDA x model.ops_backend auto (each op what the op bench measured fastest:
            attention = torch SDPA, default dispatch) | triton (every op ours, attention our Triton kernel); on CPU
            auto (the C++ twins where ops/_dispatch.py's CPU_AUTO measured them faster, the PyTorch ops for the
            rest; Triton would run under its interpreter) | reference (every op PyTorch's); on CUDA also
            model.compile=blocks
            (models/compile.py) x checkpointing full | selective | none with ops=auto, switched on the one model by
            use_compiled (on CPU Inductor compiles for ~50 s: opt in with DOPSD_BENCH_COMPILE="none blocks")
  patched   the baseline's loop, model, adapters and optimizer, patched by apply_dopsd_kernels (removed again for the
            baseline's configurations, outside the timed iteration); gradient checkpointing on | off x
            attention="sdpa" (diffusers' dispatch, torch SDPA's own choice) | "dopsd" (our packed_attention); the
            ops backend is dopsd_fast's default for the device (auto, as ours' first configuration)
A configuration that runs out of memory (torch.OutOfMemoryError; the other side's resident weights are on the
device too, see ``other_resident_bytes``), or whose SDPA backend has no kernel for the shape ("refused"), is recorded
as such; any other exception fails the run.

Per size: (1) equivalence: every configuration, from the same snapshot of adapters, EMA teacher, masters and (empty)
AdamW state and the same noise seed, runs EQUIVALENCE_ITERATIONS iterations; its losses (every roll-out step) and
grad norms (the clip_grad_norm_ return value, both sides) must match the reference run, the baseline's released
configuration, within TOLERANCE: a fast configuration that computes something else fails the bench. The first
iteration is warm-up (a compiled configuration compiles its blocks there: each run records the graphs dynamo
compiled during its timed iterations, ``timed_compilations``, expected 0); on CUDA the others are timed and
measured, on CPU the second is measured with the profiler (slow) and the rest timed. (2) ``rounds`` round-robin
cycles (the pytest-benchmark rounds, once under --benchmark-disable): each configuration one timed iteration per
cycle, so machine noise hits all alike.
Timed rounds stop early past DOPSD_BENCH_DEADLINE (unix seconds; scripts/device_check.sh sets it). (3) CUDA, opt-in
(DOPSD_BENCH_PROFILE=1): one more iteration of each configuration under the torch profiler, ``runs[*].profile``:
kernels launched, the seconds the GPU ran at least one kernel (``gpu_busy_s``) and the profiled wall; the median
minus ``gpu_busy_s`` is the time per iteration the GPU waited on the host.

Memory per configuration: ``resident`` = unique bytes of the side's parameters, optimizer state and EMA master or
fp32 masters held between iterations; ``transient`` = the highest bytes allocated during an iteration above what was
live at its start (CUDA: caching-allocator peak, max over the measured iterations; CPU: every allocation and free of
one iteration recorded by the torch profiler); ``peak`` = resident + transient (the other side not counted).

Budgets: CUDA 24, 48, 80 GiB and the card's whole memory; CPU multiples CPU_BUDGETS of the reference run's peak
(the baseline's released configuration at this size), chosen where the two sides' configurations separate.

Output: the tables are printed (pytest -s) and go to extra_info ("runs", "pareto", "pareto_table"); with
DOPSD_BENCH_OUT=dir each size also writes dir/pareto_<size>.json at once (a later size that times out keeps it).
Sizes: CPU a small Z-Image (fp32); CUDA the real Z-Image-Turbo 6B architecture with random bf16 weights at 512^2
and 1024^2, LoRA r64, batch 1 (one build serves both). Under --benchmark-disable (CI) each size runs at a tiny size;
DOPSD_BENCH_SMOKE=1 times that tiny size (scripts/device_check.sh --cpu). DOPSD_BENCH_ROUNDS=N sets the rounds;
DOPSD_BENCH_SDPA / DOPSD_BENCH_OPS / DOPSD_BENCH_PATCHED replace the attention lists of ``configurations`` (an empty
DOPSD_BENCH_PATCHED leaves the patched side out), DOPSD_BENCH_COMPILE its list of model.compile modes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import pytest
import torch
from baselines.released_loop import ReleasedLoop, diffusers_transformer
from pareto import busy_seconds, equivalence, pareto, render

from dopsd_fast.integrations.diffusers import apply_dopsd_kernels
from dopsd_fast.method.roles import LoRARoles
from dopsd_fast.method.schedule import rollout_sigmas
from dopsd_fast.method.step import dopsd_step
from dopsd_fast.metrics.flops import dopsd_iteration, verl_omni_iteration, zimage_layout
from dopsd_fast.models.adapter import model_family
from dopsd_fast.models.checkpointing import CheckpointPlan
from dopsd_fast.models.compile import compile_blocks, use_compiled
from dopsd_fast.models.z_image import ZImageConfig
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.testing import randomize_weights
from dopsd_fast.train.memory import optimizer_tensors, unique_bytes
from dopsd_fast.train.telemetry import peak_tflops

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
SIGMAS = [1.0, 0.9, 0.75, 0.5]
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
GRAD_CLIP, EMA_DECAY = 1.0, 0.9999
EQUIVALENCE_ITERATIONS = 3
# Relative tolerance (losses, grad norms) vs the reference run over the first EQUIVALENCE_ITERATIONS iterations.
# fp32 (CPU): the sides differ only in summation order (packed vs padded attention, per-step vs one backward, the
# caption path once), a few ulps per op; tests/test_baseline_loop.py holds them to 1e-5 over 3 iterations. bf16
# (CUDA): every forward rounds activations to 8 mantissa bits and attention backends accumulate differently; the
# first losses of the two sides differed by up to 4.1e-3 on an H200 (bench/results/2026-11-26-h200-run2/bench_e2e.json).
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}
GiB = 2**30
# CPU budgets, multiples of the reference run's peak (the baseline checkpointed), set where the configurations
# separate at cpu-small (bench/results/2026-12-05-cpu-pareto.json: peaks ours full 0.89x, selective 1.30x, none
# 1.43x, baseline without checkpointing 3.59x): 0.95 holds ours checkpointed but not the baseline, 1.0 the baseline
# checkpointed, 1.35 ours selective, 1.5 ours without checkpointing (not the baseline without), 4 both without;
# None: no limit (the machine's memory).
CPU_BUDGETS = (0.95, 1.0, 1.35, 1.5, 4.0, None)


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    arch: ZImageConfig                    # (bench_24gb.py also runs a Flux2KleinConfig through Ours)
    latent: tuple[int, ...]               # (C, F, H, W); FLUX.2 [klein]: (C, H, W)
    caption_tokens: tuple[int, int]       # real tokens of c_s (text) and c_t (text + target image)
    rank: int
    dtype: torch.dtype
    rounds: int                           # round-robin timed cycles after the equivalence iterations


SMALL = ZImageConfig(dim=256, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=128,
                     axes_dims=(16, 24, 24), axes_lens=(512, 64, 64))
TINY = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                    axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
# c_t: the teacher's VLM sees the target resized into [512^2, 768^2] pixels, (H/32)(W/32) image tokens (256 for a
# 512^2 crop, 576 for 1024^2), plus the prompt's ~128 (method.md section 6). CUDA rounds: 14 configurations (2
# patched: device_check.sh's DOPSD_BENCH_PATCHED=sdpa) x (3 equivalence + rounds) iterations of ~1.3 s (512^2) /
# ~2.7 s (1024^2) on an H200 fit scripts/device_check.sh's budget.
CASES = {
    "cpu-small": Case("cpu", SMALL, (16, 1, 32, 32), (40, 90), 16, torch.float32, 8),
    "cuda-6b-512": Case("cuda", ZImageConfig(), (16, 1, 64, 64), (128, 384), 64, torch.bfloat16, 1),
    "cuda-6b-1024": Case("cuda", ZImageConfig(), (16, 1, 128, 128), (128, 704), 64, torch.bfloat16, 1),
}
SMOKE = Case("cpu", TINY, (16, 1, 16, 16), (7, 20), 4, torch.float32, 1)


@dataclasses.dataclass(frozen=True)
class Config:
    side: str            # "ours" | "baseline" | "patched"
    checkpointing: str   # ours: model.checkpointing (full | selective | none); baseline, patched: on | off
    attention: str       # ours: model.ops_backend; baseline: SDPA backend (default | flash | cudnn | efficient);
                         # patched: apply_dopsd_kernels' attention (sdpa | dopsd)
    compile: str = "none"  # ours: model.compile (none | blocks); baseline, patched: none

    @property
    def label(self) -> str:
        """compile=none is left out of the label: the labels of earlier result files stay comparable."""
        knob = {"ours": "ops", "baseline": "sdpa", "patched": "attn"}[self.side]
        return f"{self.side} ckpt={self.checkpointing} {knob}={self.attention}" + (
            f" compile={self.compile}" if self.compile != "none" else "")


def configurations(device: str) -> list[Config]:
    """Every legitimate configuration of each side, baseline first (its released configuration is the reference),
    then the sides interleaved. DOPSD_BENCH_SDPA / DOPSD_BENCH_OPS / DOPSD_BENCH_PATCHED / DOPSD_BENCH_COMPILE
    (space-separated) replace the attention lists and the model.compile modes (a rerun short of time, a check of
    the refusal path on CPU, or compile on CPU: "none blocks", ~50 s of Inductor). Compiled modes run with the first
    ops entry only (auto on CUDA): compile is a lever of its own, not crossed with every backend."""
    sdpa = ("flash", "cudnn", "efficient") if device == "cuda" else ("default",)
    ops = ("auto", "triton") if device == "cuda" else ("auto", "reference")
    compile_modes = ("none", "blocks") if device == "cuda" else ("none",)
    sdpa = tuple(os.environ.get("DOPSD_BENCH_SDPA", " ".join(sdpa)).split())
    ops = tuple(os.environ.get("DOPSD_BENCH_OPS", " ".join(ops)).split())
    compile_modes = tuple(os.environ.get("DOPSD_BENCH_COMPILE", " ".join(compile_modes)).split())
    patched_attention = tuple(os.environ.get("DOPSD_BENCH_PATCHED", "sdpa dopsd").split())
    baseline = [Config("baseline", c, a) for c in ("on", "off") for a in sdpa]
    ours = [Config("ours", c, a, m) for m in compile_modes for c in ("full", "selective", "none")
            for a in (ops if m == "none" else ops[:1])]
    patched = [Config("patched", c, a) for c in ("on", "off") for a in patched_attention]
    order = []
    for i in range(max(len(baseline), len(ours), len(patched))):
        order += baseline[i:i + 1] + ours[i:i + 1] + patched[i:i + 1]
    return order


SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
# what SDPA raises when the allowed backends have no kernel for the call (CUDA, CPU)
SDPA_REFUSALS = ("No available kernel", "No viable backend for scaled_dot_product_attention")


def sdpa_only(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA[name]))


# ---------------------------------------------------------------------------------------------- building
class Side:
    """One side's model, optimizer and the snapshot every configuration starts from."""

    optimizer: torch.optim.Optimizer

    def prepare(self, config: Config) -> None:
        """Switches between configurations that are not part of an iteration's time (the patched side's patch)."""

    def trained(self) -> list[torch.Tensor]:
        """Every tensor an iteration changes (adapters, EMA teacher, masters); AdamW's state is cleared instead."""
        raise NotImplementedError

    def snapshot(self, device: str | torch.device | None = None) -> None:
        """``device``: where the copies live (default beside the tensors; bench_24gb.py keeps them on the host, off
        its capped GPU)."""
        self._saved = [t.detach().to(t.device if device is None else device, copy=True) for t in self.trained()]

    @torch.no_grad()
    def restore(self) -> None:
        for t, s in zip(self.trained(), self._saved, strict=True):
            t.copy_(s)
            t.grad = None
        self.optimizer.state.clear()          # AdamW builds fresh state in its next step, as after construction
        self.optimizer.zero_grad(set_to_none=True)


class Ours(Side):
    """dopsd_fast's iteration, as Trainer.forward_backward_step + optimizer_step run it (device-placed here).

    ``base``: the base weights (a state dict, loaded into a new model) or the model itself, used without a copy
    (``random_model``; bench_24gb.py). The family (Z-Image or FLUX.2 [klein]: flow convention, model class) follows
    ``case.arch``; ``targets`` / ``sigmas`` (sigma_0 .. sigma_K = 0) / ``alpha`` default to this bench's recipe."""

    def __init__(self, base: dict | torch.nn.Module, case: Case, targets: list[str] | None = None,
                 sigmas: list[float] | None = None, alpha: float | None = None):
        family = model_family(case.arch)
        if isinstance(base, torch.nn.Module):
            model = base
        else:
            with torch.device("meta"):
                model = family.model_cls(case.arch)
            model = model.to(case.dtype).to_empty(device=case.device)
            model.load_state_dict(base, strict=True)
        alpha = 2.0 * case.rank if alpha is None else alpha
        self.roles = LoRARoles(model, TARGETS if targets is None else list(targets), case.rank, alpha)
        self.optimizer = torch.optim.AdamW(self.roles.trainable.values(), **OPTIM)
        self.flow = family.flow
        self.sigmas = rollout_sigmas(SIGMAS) if sigmas is None else list(sigmas)
        self.dtype = case.dtype
        self.compiled = False         # blocks wrapped by compile_blocks (lazily, at the first compiled configuration)

    def trained(self):
        ema = self.roles.ema
        return list({id(t): t for t in (*self.roles.trainable.values(), *ema.master, *ema.teacher)}.values())

    def iteration(self, config: Config, c_s, c_t, latent, generator) -> tuple[list[float], float]:
        model = self.roles.model
        model.checkpointing = CheckpointPlan(config.checkpointing)
        if config.compile != "none" and not self.compiled:
            self.compiled = compile_blocks(model, config.compile) > 0     # traces in this (warm-up) iteration
        if self.compiled:             # model.compile: the kept compiled blocks on or off, no recompilation
            use_compiled(model, config.compile != "none")
        with use_backend(config.attention):     # model.ops_backend, as the trainer applies it around the step
            out = dopsd_step(self.roles, self.flow, c_s, c_t, [latent], self.sigmas, loss_kind="x0",
                             per_step_backward=True, generator=generator, dtype=self.dtype)
            norm = torch.nn.utils.clip_grad_norm_(list(self.roles.trainable.values()), GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.roles.update_teacher(EMA_DECAY)
        return out.losses, float(norm)

    def resident(self) -> list[torch.Tensor]:
        return [*self.roles.model.parameters(), *optimizer_tensors(self.optimizer), *self.roles.ema.master]


class Baseline(Side):
    """The released loop; it also serves the patched side (one model: a second 6B copy would not fit beside ours)."""

    def __init__(self, model, case: Case):
        self.loop = ReleasedLoop(model, targets=TARGETS, rank=case.rank, alpha=2.0 * case.rank, sigmas=SIGMAS,
                                 grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, **OPTIM)
        self.optimizer = self.loop.optimizer
        self.checkpointing = True
        self.patch = None         # the DopsdPatch of the patched side's configuration in use

    def prepare(self, config: Config) -> None:
        """The user's one call, apply_dopsd_kernels(model, attention=...), for a patched configuration; the
        unpatched model (the patch removed: diffusers' own forwards) for a baseline one."""
        want = config.attention if config.side == "patched" else None
        if self.patch is not None and self.patch.attention != want:
            self.patch.remove()
            self.patch = None
        if want is not None and self.patch is None:
            self.patch = apply_dopsd_kernels(self.loop.model, attention=want)

    def trained(self):
        return [*self.loop.student.values(), *self.loop.teacher.values(), *(self.loop.masters or [])]

    def iteration(self, config: Config, c_s, c_t, latent, generator) -> tuple[list[float], float]:
        on = config.checkpointing == "on"
        if on != self.checkpointing:      # the released script's --gradient_checkpointing flag
            (self.loop.model.enable_gradient_checkpointing if on else self.loop.model.disable_gradient_checkpointing)()
            self.checkpointing = on
        self.prepare(config)       # a no-op after one()'s untimed prepare
        with sdpa_only(config.attention if config.side == "baseline" else "default"):
            losses = self.loop.forward_backward(c_s, c_t, latent, 1, generator)
        return losses, self.loop.optimizer_step()

    def resident(self) -> list[torch.Tensor]:
        return [*self.loop.model.parameters(), *(self.loop.masters or []), *optimizer_tensors(self.loop.optimizer)]


def random_model(case: Case, seed: int = 0) -> torch.nn.Module:
    """The case's architecture (``case.arch``: either family) built straight on its device in its dtype, random
    weights (testing.randomize_weights): one copy of the base, for ``Ours(model, case)``."""
    with torch.device("meta"):
        model = model_family(case.arch).model_cls(case.arch)
    return randomize_weights(model.to(case.dtype).to_empty(device=case.device), seed=seed)


def build(case: Case) -> dict[str, Side]:
    torch.manual_seed(0)      # our LoRA init; PEFT's is overwritten with it below
    theirs = diffusers_transformer(case.arch, case.device, case.dtype)
    randomize_weights(theirs, seed=0)
    ours = Ours(theirs.state_dict(), case)
    baseline = Baseline(theirs, case)
    # identical adapters on both sides
    baseline.loop.load_adapters(dict(ours.roles.trainable), dict(zip(ours.roles.ema.names, ours.roles.ema.teacher)))
    for side in (ours, baseline):
        side.snapshot()
    return {"ours": ours, "baseline": baseline, "patched": baseline}


@pytest.fixture(scope="module")
def built():
    """Built sides by (device, arch, rank, dtype): the two CUDA sizes share one 6B build per side."""
    cache: dict = {}
    yield cache
    cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profiled_transient(run, device: str) -> int:
    """CPU: highest bytes allocated during ``run()`` above what was live when it started (torch profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation and n.extra_fields.device.type == device:
                events.append((n.start_time_ns, n.extra_fields.alloc_size))   # negative for a free
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def measured(run, device: str) -> tuple[object, float, float, int | None]:
    """(run()'s result, wall seconds, process CPU seconds, CUDA transient bytes or None)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    transient = torch.cuda.max_memory_allocated() - start if device == "cuda" else None
    return result, wall, cpu, transient


def device_profile(run) -> dict:
    """One iteration of ``run()`` under the torch profiler (CUDA): kernels, GPU-busy seconds, profiled wall."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        run()
        sync("cuda")
        wall = time.perf_counter() - wall
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {"kernels": len(kernels), "gpu_busy_s": busy_seconds(kernels) / 1e6, "profiled_wall_s": wall}


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a compiled configuration's first iterations add some)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def failure(err: BaseException, caught: list) -> tuple[str, str]:
    """(status, why) of a configuration that raised."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(err):
        return "out of memory", text[:300]
    if isinstance(err, RuntimeError) and any(m in str(err) for m in SDPA_REFUSALS):
        # SDPA says why only in the warnings it emits first
        why = "; ".join(str(w.message) for w in caught if "sdp" in str(w.message).lower() or "kernel" in str(w.message))
        return "refused", (why or text)[:600]
    return "error", f"{type(err).__name__}: {text}"[:600]


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_flops(device: str) -> tuple[float, str]:
    """(FLOP/s the MFU is relative to, what it is)."""
    if device == "cuda":
        name, peak = torch.cuda.get_device_name(), peak_tflops(None)
        return (peak * 1e12, f"{name} dense bf16 peak") if peak else (float("nan"), f"{name}: no peak on record")
    a = torch.randn(1024, 1024)
    best = min(measured(lambda: a @ a, device)[1] for _ in range(5))
    return 2 * 1024**3 / best, "measured fp32 1024^3 matmul rate on this CPU"


def budgets(case: Case, reference: dict) -> list[tuple[str, int | None]]:
    if case.device == "cuda":
        card = torch.cuda.get_device_properties(0).total_memory
        return [*((f"{n} GiB", n * GiB) for n in (24, 48, 80)), (f"whole card {card / GiB:.1f} GiB", card)]
    ref = reference["peak_bytes"]
    return [(f"{m:g}x ref ({m * ref / 2**20:.1f} MiB)", int(m * ref)) if m else ("no limit", None)
            for m in CPU_BUDGETS]


# ---------------------------------------------------------------------------------------------- the bench
@pytest.mark.benchmark(group="dopsd_e2e")
@pytest.mark.parametrize("size", list(CASES))
def test_pareto(benchmark, built, size):
    case = CASES[size]
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if case.device == "cpu" and torch.cuda.is_available():
        pytest.skip("the GPU machine runs the GPU sizes")
    smoke = benchmark.disabled or os.environ.get("DOPSD_BENCH_SMOKE") == "1"
    if smoke:
        case = SMOKE
    rounds = int(os.environ.get("DOPSD_BENCH_ROUNDS", case.rounds))
    deadline = float(os.environ.get("DOPSD_BENCH_DEADLINE", "inf"))
    load = [os.getloadavg()[0]]
    key = (case.device, repr(case.arch), case.rank, case.dtype)
    if key not in built:
        built.clear()
        release(case.device)
        built[key] = build(case)
    sides = built[key]
    g = torch.Generator().manual_seed(1)
    c_s, c_t = ([torch.randn(n, case.arch.cap_feat_dim, generator=g).to(case.device, case.dtype)]
                for n in case.caption_tokens)
    device, latent = case.device, case.latent
    runs = [dict(label=c.label, side=c.side, checkpointing=c.checkpointing, attention=c.attention, compile=c.compile,
                 status="ok", why="", seconds=[], cpu_seconds=[], losses=[], grad_norms=[], transient_bytes=0,
                 timed_compilations=0)
            for c in configurations(device)]
    configs = dict(zip((r["label"] for r in runs), configurations(device)))

    def attempt(run: dict, body) -> None:
        """body() for one configuration; an exception becomes its status (the state is restored before reuse)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                body()
                return
            except Exception as err:        # noqa: BLE001 (recorded; "error" fails the bench below)
                run["status"], run["why"] = failure(err, caught)
        for side in sides.values():       # an iteration cut short may leave gradients behind
            side.optimizer.zero_grad(set_to_none=True)
            for t in side.trained():
                t.grad = None
        release(device)

    def one(run: dict, generator, timed: bool, profile: bool) -> tuple[list[float], float]:
        side, config = sides[run["side"]], configs[run["label"]]
        side.prepare(config)

        def iteration():
            return side.iteration(config, c_s, c_t, latent, generator)
        if profile:                               # CPU memory: one profiled iteration, not timed
            out = None

            def keep():
                nonlocal out
                out = iteration()
            run["transient_bytes"] = max(run["transient_bytes"], profiled_transient(keep, device))
            return out
        graphs = compiled_graphs()
        out, wall, cpu, transient = measured(iteration, device)
        if timed:
            run["timed_compilations"] += compiled_graphs() - graphs     # compiling belongs in the warm-up
            run["seconds"].append(wall)
            if device == "cpu":       # on CUDA the host mostly waits in a sync: its CPU time says little
                run["cpu_seconds"].append(cpu)
        if transient is not None and timed:
            run["transient_bytes"] = max(run["transient_bytes"], transient)
        return out

    # (1) every configuration from the same state and noise: equivalence, memory, first timings
    for run in runs:
        side = sides[run["side"]]

        def first_iterations(run=run, side=side):
            side.restore()
            noise = torch.Generator().manual_seed(30)
            for i in range(EQUIVALENCE_ITERATIONS):      # 0: warm-up; CPU: 1 profiled for memory
                profile = device == "cpu" and i == 1
                losses, norm = one(run, noise, timed=i > 0 and not profile, profile=profile)
                run["losses"].append(losses)
                run["grad_norms"].append(norm)
            run["resident_bytes"] = unique_bytes(side.resident())
        attempt(run, first_iterations)
    ok = [r for r in runs if r["status"] == "ok"]
    for r in runs:
        r["other_resident_bytes"] = unique_bytes(sides["baseline" if r["side"] == "ours" else "ours"].resident())

    # (2) round-robin timed cycles (pytest-benchmark's rounds time a whole cycle)
    noises = {r["label"]: torch.Generator().manual_seed(31) for r in ok}

    def cycle():
        if time.time() > deadline:
            return
        for run in runs:
            if run["status"] == "ok":
                attempt(run, lambda run=run: one(run, noises[run["label"]], timed=True, profile=False))

    benchmark.pedantic(cycle, rounds=rounds, warmup_rounds=0, iterations=1)
    load.append(os.getloadavg()[0])
    # (3) where the time goes on the GPU: busy vs waiting on the host (opt-in: a profiled iteration each)
    if device == "cuda" and os.environ.get("DOPSD_BENCH_PROFILE") == "1":
        for run in ok:
            side, config, noise = sides[run["side"]], configs[run["label"]], noises[run["label"]]
            try:        # a diagnostic: its failure is recorded, never the bench's
                run["profile"] = device_profile(lambda: side.iteration(config, c_s, c_t, latent, noise))
            except Exception as err:        # noqa: BLE001
                run["profile_error"] = f"{type(err).__name__}: {err}"[:300]
                for t in side.trained():
                    t.grad = None
                release(device)

    # results
    image_tokens = latent[-1] // 2 * (latent[-2] // 2)
    student, teacher = (zimage_layout(case.arch, image_tokens, n) for n in case.caption_tokens)
    adapters = (case.rank, sides["ours"].roles.targets)     # the baseline's PEFT adapters sit on the same linears
    peak, peak_note = peak_flops(device)
    for r in runs:
        # each side's own work: ours runs the caption refiner once per role, the released loop in every forward
        per_step = r["side"] != "ours"
        r["model_flops_per_iteration"] = dopsd_iteration(teacher, student, len(SIGMAS), adapters,
                                                         context_per_step=per_step).total
        r["model_flops_per_iteration_verl_omni"] = verl_omni_iteration(teacher, student, len(SIGMAS),
                                                                       context_per_step=per_step).total
        if r["status"] == "ok" and r["seconds"]:
            med = statistics.median(r["seconds"])
            r["it_per_s"] = r["images_per_s"] = 1 / med
            r["mfu"] = r["model_flops_per_iteration"] / med / peak
            r["mfu_verl_omni"] = r["model_flops_per_iteration_verl_omni"] / med / peak
            r["peak_bytes"] = r["resident_bytes"] + r["transient_bytes"]
        else:
            r["peak_bytes"] = None
    reference = next((r for r in runs if r["side"] == "baseline" and r["status"] == "ok"), None)
    assert reference is not None, "no baseline configuration ran: " + "; ".join(f"{r['label']}: {r['why']}"
                                                                            for r in runs)
    reference["reference"] = True
    loss_rel, norm_rel = TOLERANCE[case.dtype]
    failures = equivalence(runs, reference, loss_rel, norm_rel)
    rows = pareto(runs, budgets(case, reference))
    name = f"smoke ({size})" if smoke else size
    first_timed = EQUIVALENCE_ITERATIONS - 1 - (device == "cpu")    # warm-up and the profiled one untimed
    header = [f"{name} on {_device_name(device)}, {case.dtype}, {torch.get_num_threads()} thread(s), 1-min load "
              f"{load[0]:.2f} -> {load[-1]:.2f}; timed iterations per configuration: {first_timed} + {rounds} "
              f"round(s); MFU vs {peak_note}",
              f"equivalence: first {EQUIVALENCE_ITERATIONS} iterations from one state and seed vs {reference['label']}: "
              f"losses rel <= {loss_rel:g}, grad norms rel <= {norm_rel:g}",
              "ops=auto: each op the fastest measured on the device (CUDA: attention torch SDPA, default dispatch; "
              "CPU: our C++ epilogues, the PyTorch ops for the rest); ops=triton: "
              "every op ours, attention our Triton kernel; ops=reference: the PyTorch ops; sdpa=X: torch SDPA "
              "restricted to backend X; compile=blocks: model.compile=blocks (Inductor, not bitwise: within the "
              "tolerance); patched attn=X: the released loop unchanged but for apply_dopsd_kernels(model, attention=X) "
              "on its diffusers model (ops backend as ours)"]
    recompiled = [f"{r['label']}: {r['timed_compilations']}" for r in runs if r["timed_compilations"]]
    if recompiled:
        header.append("graphs compiled during timed iterations (their times include compiling): "
                      + ", ".join(recompiled))
    table = render(runs, rows, header)
    info = {"case": name, "device": _device_name(device), "dtype": str(case.dtype),
            "threads": torch.get_num_threads(), "load_1min_before_after": load, "mfu_reference": peak_note,
            "equivalence": {"iterations": EQUIVALENCE_ITERATIONS, "reference": reference["label"],
                            "loss_rel_tolerance": loss_rel, "grad_norm_rel_tolerance": norm_rel, "failures": failures},
            "rounds": rounds, "runs": runs, "pareto": rows, "pareto_table": table}
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(table))
    if os.environ.get("DOPSD_BENCH_OUT"):
        out = Path(os.environ["DOPSD_BENCH_OUT"], f"pareto_{size}.json")
        out.write_text(json.dumps({"benchmarks": [{"name": f"test_pareto[{size}]", "extra_info": info}]}, indent=1))
    if device == "cuda":
        release(device)
    assert not failures, "configurations that compute something else or failed:\n" + "\n".join(failures)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
