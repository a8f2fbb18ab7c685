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


def test_summary_of_an_older_one_pair_e2e_record(tmp_path):
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


PARETO_TABLE = ["cuda-6b-512 on NVIDIA H100 80GB HBM3, torch.bfloat16",
                "configuration  status  it/s",
                "memory budget  ours: fastest that fits  baseline: fastest that fits  speed",
                "24 GiB  ours ckpt=full ops=auto 0.700 it/s  baseline ckpt=on sdpa=flash 0.600 it/s  1.17"]


def pareto_record(size: str, failures=()) -> dict:
    return {"name": f"test_pareto[{size}]",
            "extra_info": {"case": size, "pareto_table": [t.replace("cuda-6b-512", size) for t in PARETO_TABLE],
                           "equivalence": {"failures": list(failures)}}}


def test_summary_prints_the_pareto_tables_last_and_equivalence_failures(tmp_path):
    (tmp_path / "stages.tsv").write_text("e2e\t1\t200\tPareto\n")
    records = [pareto_record("cuda-6b-512"), pareto_record("cuda-6b-1024", ["ours ckpt=none ops=triton: losses rel"])]
    (tmp_path / "bench_e2e.json").write_text(json.dumps({"benchmarks": records}))
    text = summarize(tmp_path)
    assert "e2e" in text and "FAILED" in text
    assert text.index("cuda-6b-512 on NVIDIA") < text.index("cuda-6b-1024 on NVIDIA")
    assert text.count("24 GiB  ours ckpt=full ops=auto") == 2
    assert text.strip().splitlines()[-1] == "EQUIVALENCE FAILED ours ckpt=none ops=triton: losses rel"


def test_parts_merge_into_one_e2e_and_one_ops_file(tmp_path):
    """A timed-out e2e pytest writes no pytest-benchmark file: the bench's own per-size records still make
    bench_e2e.json; the two op bench files make bench_ops.json; the parts go (the device tool returns 8 files)."""
    (tmp_path / "pareto_cuda-6b-512.json").write_text(json.dumps({"benchmarks": [pareto_record("cuda-6b-512")]}))
    pytest_file = {"machine_info": {"node": "gpu"}, "benchmarks": [{**pareto_record("cuda-6b-1024"), "stats": {}}]}
    (tmp_path / "bench_e2e_pytest.json").write_text(json.dumps(pytest_file))
    (tmp_path / "pareto_cuda-6b-1024.json").write_text(json.dumps({"benchmarks": [pareto_record("cuda-6b-1024")]}))
    for part, name in (("rest", "test_epilogues[x]"), ("attention", "test_packed_attention[y]")):
        (tmp_path / f"bench_ops_{part}.json").write_text(
            json.dumps({"benchmarks": [{"name": name, "stats": {"median": 1e-3}, "extra_info": {}}]}))
    env = {**os.environ, "OUT": str(tmp_path), "STAGES": "none", "BUDGET_S": "60"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--cpu"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_e2e.json", "bench_ops.json", "device_check.log",
                                                          "stages.tsv", "summary.txt"]
    e2e = json.loads((tmp_path / "bench_e2e.json").read_text())
    assert e2e["machine_info"] == {"node": "gpu"}          # pytest-benchmark's file first, its record kept
    assert [b["name"] for b in e2e["benchmarks"]] == ["test_pareto[cuda-6b-1024]", "test_pareto[cuda-6b-512]"]
    assert "stats" in e2e["benchmarks"][0]
    ops = json.loads((tmp_path / "bench_ops.json").read_text())
    assert [b["name"] for b in ops["benchmarks"]] == ["test_epilogues[x]", "test_packed_attention[y]"]
    assert "cuda-6b-512 on NVIDIA" in r.stdout and "test_packed_attention[y]" in r.stdout


def test_summary_prints_the_24gb_verdicts_before_the_pareto_tables(tmp_path):
    (tmp_path / "stages.tsv").write_text("mem24\t0\t150\t24 GiB cap\n")
    summary = ["zimage-bf16: fits at 24 GiB: 10 iterations, peak 17.10 GiB allocated / 18.00 reserved, 0.400 it/s",
               "klein9b-bf16: does not fit at 24 GiB: needs 25.50 GiB allocated (26.00 reserved)"]
    (tmp_path / "bench_24gb.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "cap_gib": 24.0,
                                                          "iterations": 10, "runs": [], "summary": summary}))
    (tmp_path / "bench_e2e.json").write_text(json.dumps({"benchmarks": [pareto_record("cuda-6b-1024")]}))
    text = summarize(tmp_path)
    assert "24 GiB check (24 GiB cap on NVIDIA H100 80GB HBM3, 10 iterations each):" in text
    assert text.index("klein9b-bf16: does not fit at 24 GiB: needs 25.50 GiB") < text.index("cuda-6b-1024 on NVIDIA")
    (tmp_path / "bench_24gb.json").unlink()
    assert "24 GiB check" not in summarize(tmp_path)               # the stage did not run: no line at all


def test_cpu_dry_run_of_the_24gb_stage(tmp_path):
    """The second call's new stage (bench/bench_24gb.py --cpu): every configuration's verdict in bench_24gb.json and
    in the summary; STAGES=all includes it."""
    env = {**os.environ, "OUT": str(tmp_path), "STAGES": "mem24", "BUDGET_S": "120", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--cpu"], capture_output=True, text=True,
                       timeout=180, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "stages.tsv").read_text().startswith("mem24\t0\t")
    report = json.loads((tmp_path / "bench_24gb.json").read_text())
    assert [x["name"] for x in report["runs"]] == ["zimage-bf16", "zimage-fp8", "klein9b-bf16", "klein9b-fp8"]
    assert [x["status"] for x in report["runs"]] == ["fits", "fits", "fits", "not needed"]
    assert "  klein9b-bf16: fits (CPU, no cap)" in r.stdout
    script = (ROOT / "scripts" / "device_check.sh").read_text()
    assert 'STAGES="$DEFAULT_STAGES ops csrc train fp8 mem24"' in script
