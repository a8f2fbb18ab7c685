"""scripts/device_check.sh and its summary (scripts/summarize_bench.py), exercised on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarize(out: Path) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_bench.py"), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (out / "summary.txt").read_text() == r.stdout
    return r.stdout


def test_summary_reports_failures_tests_and_e2e_last(tmp_path):
    (tmp_path / "stages.tsv").write_text("versions\t0\t3\tversions\npackage\t3\t40\tno ext\nops\t124\t90\tops\n")
    (tmp_path / "tests_ops.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.ops.test_x" name="test_a"><failure message="boom"/></testcase>'
        '</testsuite></testsuites>')
    side = {"it_per_s": 2.0, "peak_bytes": 3 * 2**20, "mfu": 0.25}
    e2e = {"case": "cuda-6b-512", "device": "NVIDIA H100 80GB HBM3", "ours": side,
           "baseline": {**side, "it_per_s": 1.0, "peak_bytes": 4 * 2**20, "mfu": 0.125},
           "speedup_min_median_max": [1.9, 2.0, 2.1], "peak_memory_ratio_ours_over_baseline": 0.75}
    (tmp_path / "bench_e2e_cuda-6b-512.json").write_text(json.dumps({"benchmarks": [{"name": "test_e2e", "extra_info": e2e}]}))
    text = summarize(tmp_path)
    assert "FAILED" in text and "TIMED OUT" in text
    assert "FAILED tests.ops.test_x::test_a" in text
    assert "ops" in text and "(no bench_ops.json)" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("cuda-6b-512") and "1.90/2.00/2.10" in last and "3/4" in last and "0.75" in last


def test_cpu_dry_run_of_one_stage_ends_with_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "STAGES": "versions", "BUDGET_S": "60"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--cpu"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "stages.tsv").read_text().startswith("versions\t0\t")
    assert "torch" in (tmp_path / "device_check.log").read_text()
    assert r.stdout.rstrip().endswith("(no bench_e2e*.json)")      # the summary is printed last
