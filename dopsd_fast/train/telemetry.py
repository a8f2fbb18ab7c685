"""Per-step telemetry beside the loss: where the time went, MFU, peak memory and (on a GPU) NVML readings.

Time breakdown of one iteration (seconds, this rank; on a GPU, device time between CUDA events recorded at each
section's edges, see StepTimer):
  teacher_s   forwards run without autograd (the teacher role)
  student_s   forwards run with autograd (the student role)
  backward_s  every backward of the iteration (K per-step ones and the caption path)
  optimizer_s optimizer step, clipping, EMA update (DeepSpeed: gradient reduction of ZeRO 0/1 too)
  rollout_s   the rest of the iteration: contexts, noise, Euler updates and divergences
  comm_s      DeepSpeed collectives (inside backward_s / optimizer_s, not added to them); absent without DeepSpeed
all_gathers counts this rank's parameter all-gathers in the iteration (ZeRO-3 runs only; train/zero3.py).
tokens_per_s counts the image tokens the student denoised (K roll-out steps x the global batch).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import resource
import time
from contextlib import contextmanager

import torch
from torch import nn

# Dense bf16 peak per device in TFLOP/s, by a substring of the CUDA device name, first match wins (so the PCIe
# and NVL boards come before their SXM name); train.peak_tflops overrides. NVIDIA's datasheets give the Tensor
# Core numbers with 2:4 sparsity, halved here: H100/H200 SXM 1,979 -> 989.4, H100 PCIe (and H800 PCIe) 1,513 ->
# 756.5, H100 NVL and H200 NVL 1,671 -> 835.5; A100 312 dense; L40S 362.05; B200 2,250 dense.
PEAK_TFLOPS = {"H100 PCIe": 756.5, "H800 PCIe": 756.5, "H100 NVL": 835.5, "H200 NVL": 835.5, "H200": 989.4,
               "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "B200": 2250.0}


class StepTimer:
    """Seconds per named section of a step, and of the forwards of hooked models (teacher_s / student_s).

    On CUDA a host clock times how long Python took to enqueue the kernels, not the kernels, so there each
    section's edges record a pair of ``event``s on the current stream, read in ``take()``. A section not nested
    in another (the trainer's forward_backward and optimizer_s) ends waiting for its end event: forward_backward
    has synchronised already (on its losses), so that wait is free; optimizer_s's covers the optimizer update and
    the EMA enqueued after the grad-norm sync, which so count in their own step instead of the next one's.
    """

    def __init__(self, device: torch.device | str = "cpu", event: type | None = None):
        """``event``: the CUDA event class (a test passes a fake one); default: torch.cuda.Event on a CUDA device."""
        self.event = event or (torch.cuda.Event if torch.device(device).type == "cuda" else None)
        self.spans: list[tuple[str, object, object]] = []       # (section, start mark, end mark), in end order
        self.depth = 0

    def _mark(self):
        if self.event is None:
            return time.perf_counter()
        e = self.event(enable_timing=True)
        e.record()
        return e

    @contextmanager
    def section(self, name: str):
        start = self._mark()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            end = self._mark()
            self.spans.append((name, start, end))
            if self.depth == 0 and self.event is not None:
                end.synchronize()

    def take(self) -> dict[str, float]:
        """Seconds per section since the last call (summed over repeats); resets."""
        spans, self.spans = self.spans, []
        if spans and self.event is not None:
            # forwards outside any section (samples, validation) end unwaited; on one stream the last mark ends last
            spans[-1][2].synchronize()
        out: dict[str, float] = {}
        for name, start, end in spans:
            sec = end - start if self.event is None else start.elapsed_time(end) / 1000.0     # events: ms
            out[name] = out.get(name, 0.0) + sec
        return out

    def time_forwards(self, *models: nn.Module) -> None:
        """Attribute every forward of ``models`` to the teacher (no autograd) or the student (autograd)."""
        for m in {id(m): m for m in models}.values():
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, module, args):
        module._telemetry_start = self._mark()

    def _stop(self, module, args, output):
        role = "student_s" if torch.is_grad_enabled() else "teacher_s"
        self.spans.append((role, module._telemetry_start, self._mark()))


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    """Allocator high-water mark on CUDA; the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


class GPUStats:
    """Utilisation, memory and power of this process's GPU through NVML; empty when there is none."""

    def __init__(self):
        self.handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:       # no nvidia-ml-py, or no NVML library: telemetry without it
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        mem = n.nvmlDeviceGetMemoryInfo(h)
        return {"gpu_util_pct": float(n.nvmlDeviceGetUtilizationRates(h).gpu), "gpu_mem_gib": mem.used / 2**30,
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0}


_comm_ms_so_far: dict[str, float] = {}


def comm_seconds() -> float | None:
    """Seconds in DeepSpeed collectives since the last call (its comms logger, when a run enabled it)."""
    try:
        from deepspeed.comm.comm import comms_logger
    except ImportError:
        return None
    if not comms_logger.enabled:
        return None
    return comm_ms_since_last(comms_logger.comms_dict) / 1000.0


def comm_ms_since_last(comms_dict: dict) -> float:
    """DeepSpeed (0.19) logs each collective with its op timer's elapsed time read without a reset, i.e. the op's
    running total so far, not the call's own latency (summing the records grows quadratically: seconds of
    "communication" in a sub-second step). So the newest, largest record of each op is its total, and the time
    since the last call is the growth of those totals. ``comms_dict``: {op: {msg_size: [count, [ms], ...]}}."""
    delta = 0.0
    for op, sizes in comms_dict.items():
        total = max((max(rec[1]) for rec in sizes.values() if rec[1]), default=0.0)
        delta += max(0.0, total - _comm_ms_so_far.get(op, 0.0))
        _comm_ms_so_far[op] = max(total, _comm_ms_so_far.get(op, 0.0))
    comms_dict.clear()
    return delta


def open_tensorboard(log_dir, purge_step: int | None = None) -> TensorBoard | None:
    """The TensorBoard writer of ``train.report_to: [tensorboard]``, or None when the tensorboard package is missing;
    ``purge_step``: TensorBoard hides this log dir's events from that step on (a resumed run's first step).

    train.report_to lists tensorboard by default, yet tensorboard stays in the [telemetry] extra rather than the
    dependencies: its event files are a view of the rows metrics.jsonl already holds, and it would bring a server
    stack (grpcio, protobuf, werkzeug, tensorboard-data-server: ~60 MB) into every install of a package whose ops
    other trainers import. So without it a run loses no data: it says so in one line and writes metrics.jsonl."""
    return TensorBoard(log_dir, purge_step) if _tensorboard_installed() else None


@functools.cache
def _tensorboard_installed() -> bool:
    """Checked once per process, so a run (or the demo's several runs) warns once."""
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    logging.getLogger(__name__).warning(
        "dopsd: warning: train.report_to lists tensorboard but the tensorboard package is not installed; metrics go "
        "to the other sinks only (pip install \"dopsd_fast[telemetry]\", or --set 'train.report_to=[jsonl]')")
    return False


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a JSONL row but its step, lists as ``name/k`` (losses/0 ...): what TensorBoard and wandb
    plot; null (a NaN/Inf step's) and true/false fields are left out."""
    out = {}
    for key, value in row.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}/{i}" if isinstance(value, list) else key] = v
    return out


class TensorBoard:
    """Every numeric field of a JSONL row as a scalar (``scalars``)."""

    def __init__(self, log_dir, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def image(self, tag: str, path, step: int) -> None:
        """A PNG as an image at ``step``, shrunk to 2048 pixels on its long side (1024^2 grids stay viewable)."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
        im.thumbnail((2048, 2048))
        self.writer.add_image(tag, np.asarray(im), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Telemetry:
    """The extra JSONL fields of a trainer's steps; hooks its forwards and wraps its backward once."""

    @classmethod
    def of(cls, trainer) -> "Telemetry":
        """The trainer's telemetry, created on its first ``train()`` (a second call must not hook twice)."""
        if "_telemetry" not in vars(trainer):
            trainer._telemetry = cls(trainer)
        return trainer._telemetry

    def __init__(self, trainer):
        self.timer, self.gpu, self.world = StepTimer(trainer.device), GPUStats(), trainer.world
        self.deepspeed = getattr(trainer, "engine", None) is not None     # its comms logger is process-global
        self.all_gathers = getattr(trainer, "all_gathers", None)           # ZeRO-3's all-gather counter
        self.peak = peak_tflops(trainer.cfg.train.peak_tflops)
        self.timer.time_forwards(trainer.roles.student_model, trainer.roles.teacher_model)
        inner = trainer.backward

        def timed_backward(loss):
            with self.timer.section("backward_s"):
                inner(loss)

        trainer.backward = timed_backward     # the instance attribute shadows the class's backward
        if self.deepspeed:
            comm_seconds()                     # drop collectives of set-up and resume

    def fields(self, result, sec: float) -> dict:
        s = self.timer.take()
        forward_backward = s.pop("forward_backward", 0.0)
        row = {k: s.get(k, 0.0) for k in ("teacher_s", "student_s", "backward_s", "optimizer_s")}
        row["rollout_s"] = max(0.0, forward_backward - row["teacher_s"] - row["student_s"] - row["backward_s"])
        comm = comm_seconds() if self.deepspeed else None
        if comm is not None:
            row["comm_s"] = comm
        if self.all_gathers is not None:
            row["all_gathers"] = self.all_gathers.take()
        if result.tokens:
            row["tokens_per_s"] = result.tokens / sec
        if self.peak is not None:
            row["mfu"] = result.flops / sec / (self.peak * 1e12 * self.world)
            row["mfu_verl_omni"] = result.flops_verl_omni / sec / (self.peak * 1e12 * self.world)
        row["peak_mem_gib"] = peak_memory_gib()
        row.update(self.gpu.read())
        return row
