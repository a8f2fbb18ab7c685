"""The JSONL row of a step carries the telemetry fields, with consistent values; TensorBoard gets the same rows."""
import json
from types import SimpleNamespace

import pytest
import torch

from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train import telemetry

BREAKDOWN = ("teacher_s", "student_s", "backward_s", "optimizer_s", "rollout_s")


def test_jsonl_telemetry_fields(tmp_path):
    pytest.importorskip("tensorboard")
    tr = tiny_trainer(tmp_path, "train.steps=2", "train.peak_tflops=0.5", "train.checkpoint_every=100")
    tr.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    K = len(tr.sigmas) - 1
    for r in rows:
        assert len(r["losses"]) == K and r["loss"] == pytest.approx(sum(r["losses"]) / K)
        assert r["grad_norm"] > 0 and r["lr"] == tr.cfg.optim.lr and r["ema_decay"] == tr.cfg.method.ema_decay
        assert all(r[k] >= 0 for k in BREAKDOWN)
        # the parts are disjoint pieces of the step (the loop's own bookkeeping is the rest)
        assert r["teacher_s"] > 0 and r["student_s"] > 0 and r["backward_s"] > 0
        assert sum(r[k] for k in BREAKDOWN) <= r["sec"] * 1.001
        # ... and cover it: the loop's bookkeeping outside the sections is microseconds of a step's ~0.1 s; rollout_s
        # is the remainder of forward_backward, positive when the forwards and backwards are not counted twice
        assert sum(r[k] for k in BREAKDOWN) == pytest.approx(r["sec"], rel=0.02) and r["rollout_s"] > 0
        assert r["images_per_s"] == pytest.approx(tr.cfg.train.batch_size / r["sec"])
        tokens = K * tr.cfg.train.batch_size * (tr.cfg.data.image_size // 2) ** 2     # pixel space, 2x2 patches
        assert r["tokens_per_s"] == pytest.approx(tokens / r["sec"])
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 0.5)
        # VeRL-Omni's convention counts the LoRA backward as a full one (2 x forward) and skips the adapters
        assert r["mfu_verl_omni"] > r["mfu"]
        assert r["peak_mem_gib"] > 0
        assert "comm_s" not in r and "gpu_util_pct" not in r     # no DeepSpeed, no GPU: absent, not zero
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_no_mfu_without_a_known_peak(tmp_path):
    tr = tiny_trainer(tmp_path, "train.steps=1", "train.report_to=[jsonl]")
    tr.train()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "mfu" not in row and "mfu_verl_omni" not in row and not (tmp_path / "tensorboard").exists()


def test_comm_time_is_the_growth_of_deepspeeds_running_totals():
    """DeepSpeed's comms logger records each op's running total (its timer is read without a reset)."""
    telemetry._comm_ms_so_far.clear()
    # all_reduce: calls of 2, 3, 5 ms -> records 2, 5, 10 (running totals), over two message sizes
    first = {"all_reduce": {4096: [2, [2.0, 5.0], [], []], 64: [1, [10.0], [], []]},
             "all_gather": {8: [1, [1.5], [], []]}}
    assert telemetry.comm_ms_since_last(first) == pytest.approx(10.0 + 1.5) and first == {}
    second = {"all_reduce": {4096: [1, [17.0], [], []]}}      # one more call of 7 ms
    assert telemetry.comm_ms_since_last(second) == pytest.approx(7.0)
    assert telemetry.comm_ms_since_last({}) == 0.0
    telemetry._comm_ms_so_far.clear()


class FakeEvent:
    """torch.cuda.Event on a fake device clock: record() stamps the clock, elapsed_time() reads ms between stamps."""
    clock, waits = 0.0, 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.stamp = None

    def record(self):
        self.stamp = FakeEvent.clock

    def synchronize(self):
        FakeEvent.waits += 1

    def elapsed_time(self, end):
        return (end.stamp - self.stamp) * 1000.0


class DeviceWork(torch.nn.Module):
    """A forward that keeps the fake device busy for ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        FakeEvent.clock += self.seconds
        return x


def test_cuda_sections_are_timed_by_events_read_once_per_step(monkeypatch):
    """On CUDA the sections are device time between events, never the host clock, and only the step's outer
    sections (and the read-out) wait for the device: no sync per forward or backward."""
    monkeypatch.setattr(telemetry, "time", SimpleNamespace())      # any perf_counter() call would raise
    assert telemetry.StepTimer("cuda").event is torch.cuda.Event and telemetry.StepTimer("cpu").event is None
    timer, model = telemetry.StepTimer("cuda", event=FakeEvent), DeviceWork(2.0)
    timer.time_forwards(model, model)
    for _ in range(2):          # two steps: take() resets
        FakeEvent.waits = 0
        with timer.section("forward_backward"):
            FakeEvent.clock += 0.25                 # contexts and noise
            with torch.no_grad():
                model(None)                         # teacher
            model.seconds = 3.0
            model(None)                             # student
            model.seconds = 2.0
            with timer.section("backward_s"):
                FakeEvent.clock += 4.0
        with timer.section("optimizer_s"):
            FakeEvent.clock += 0.5
        assert FakeEvent.waits == 2                 # the two outer sections' ends
        assert timer.take() == {"teacher_s": 2.0, "student_s": 3.0, "backward_s": 4.0,
                                "forward_backward": 9.25, "optimizer_s": 0.5}
        assert FakeEvent.waits == 3


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None)])
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: name)
    assert telemetry.peak_tflops(None) == peak
    assert telemetry.peak_tflops(123.0) == 123.0
