"""bench/bench_24gb.py (issue 15 item 4) on CPU: the smoke run end to end, and an OOM reported as a result with what
the configuration needs (the cap lifted, then put back), on a stand-in for the capped GPU."""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")      # bench_e2e's baseline side, imported with it
pytest.importorskip("peft")

from dopsd_fast.testing import module_from_file  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_24gb.py"


B = module_from_file(BENCH)


def test_presets_are_read_through_the_trainers_planning():
    z = B.setting("zimage", "cuda")
    assert z["case"].latent == (16, 1, 128, 128) and z["case"].caption_tokens == (512, 1024)
    assert (z["case"].rank, z["cfg"].adapter.alpha, z["cfg"].model.checkpointing) == (64, 128.0, "full")
    assert z["plan"].sigmas == [1.0, 0.9, 0.75, 0.5, 0.0] and z["plan"].total_params == 6_154_908_736
    k = B.setting("klein9b", "cuda")
    assert k["case"].latent == (128, 64, 64) and k["case"].caption_tokens == (512, 512) and k["reference"]
    assert k["plan"].total_params == 9_078_581_248 and k["text_dim"] == 12288
    assert k["plan"].sigmas == pytest.approx([1.0, 0.96738, 0.90814, 0.76720, 0.0], abs=1e-5)


def test_configs_parse_and_refuse_unknown_entries():
    assert B.parse_configs(B.DEFAULT_CONFIGS) == [("zimage", "bf16", False), ("zimage", "fp8", False),
                                                  ("klein9b", "bf16", False), ("klein9b", "fp8", True)]
    with pytest.raises(ValueError, match="'flux-bf16'"):
        B.parse_configs("flux-bf16")
    with pytest.raises(ValueError, match="'zimage-int8'"):
        B.parse_configs("zimage-int8")


def test_cpu_smoke_runs_every_configuration_and_writes_the_json(tmp_path):
    out = tmp_path / "bench_24gb.json"
    assert B.main(["--cpu", "--out", str(out), "--configs", "zimage-bf16 zimage-fp8 klein9b-bf16 klein9b-fp8"]) == 0
    report = json.loads(out.read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["zimage-bf16", "zimage-fp8", "klein9b-bf16", "klein9b-fp8"]
    for r in runs.values():
        assert r["status"] == "fits" and r["iterations"] == 3 and r["finite_losses"], r
        assert len(r["losses"][0]) == 4 and r["it_per_s"] > 0       # K = 4 roll-out steps
    assert runs["zimage-fp8"]["weights_gib"] < runs["zimage-bf16"]["weights_gib"]     # e4m3 base: fewer bytes
    assert runs["klein9b-bf16"]["context_tokens"]["teacher_reference_latent"]
    assert len(report["summary"]) == 4 and report["summary"][0].startswith("zimage-bf16: fits (CPU, no cap)")


def test_conditional_fp8_and_the_deadline(tmp_path):
    out = tmp_path / "b.json"
    assert B.main(["--cpu", "--out", str(out), "--configs", "klein9b-bf16 klein9b-fp8?", "--iterations", "2"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["status"] for r in runs] == ["fits", "not needed"]
    assert B.main(["--cpu", "--out", str(out), "--deadline", "1"]) == 0          # long past
    report = json.loads(out.read_text())
    assert {r["status"] for r in report["runs"]} == {"skipped"} and len(report["runs"]) == 4


class CappedGPU:
    """Stands in for bench_24gb.Capped on a CUDA card: the cap on or off, and the peaks of what ran."""

    cuda, card, cap_gib = True, 80 * 2**30, 24.0

    def __init__(self):
        self.on, self.calls = True, []

    def capped(self, on):
        self.on = on
        self.calls.append(on)

    def release(self):
        pass

    reset_peak = sync = release

    def peaks(self):
        return (23.5, 24.0) if self.on else (27.25, 28.0)

    def retries(self):
        return 0


def tiny_zimage():
    s = B.setting("zimage", "cpu")
    ours = B.Ours(B.random_model(s["case"]), s["case"], targets=s["cfg"].adapter.targets, sigmas=s["plan"].sigmas,
                  alpha=s["cfg"].adapter.alpha)
    ours.snapshot("cpu")
    return s, ours


def test_a_configuration_that_fits_reports_the_capped_peaks():
    s, ours = tiny_zimage()
    a = SimpleNamespace(cap_gib=24.0, iterations=3, need_iterations=2, deadline=math.inf)
    rec = B.run_config(ours, s, B.contexts(s), "zimage-bf16", "bf16", a, CappedGPU(), "reference")
    assert rec["status"] == "fits" and rec["iterations"] == 3 and len(rec["seconds"]) == 3
    assert rec["verdict"].startswith("fits at 24 GiB: 3 iterations, peak 23.50 GiB allocated / 24.00 reserved, ")
    assert rec["verdict"].endswith(" it/s") and rec["alloc_retries"] == 0 and rec["cap_gib"] == 24.0


def test_an_oom_is_a_result_with_what_it_needs_and_the_cap_comes_back(monkeypatch):
    s, ours = tiny_zimage()
    dev = CappedGPU()
    real = ours.iteration

    def iteration(*args):
        if dev.on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)
    monkeypatch.setattr(ours, "iteration", iteration)
    a = SimpleNamespace(cap_gib=24.0, iterations=10, need_iterations=2, deadline=math.inf)
    rec = B.run_config(ours, s, B.contexts(s), "zimage-bf16", "bf16", a, dev, "reference")
    assert rec["status"] == "does not fit" and rec["why"].startswith("CUDA out of memory")
    assert rec["verdict"] == "does not fit at 24 GiB: needs 27.25 GiB allocated (28.00 reserved)"
    assert dev.calls == [False, True] and dev.on                  # lifted for the measurement, then back
    assert all(t.grad is None for t in ours.trained())


def test_bench_dir_is_importable_once():
    assert sys.modules["bench_e2e"].Ours is B.Ours
