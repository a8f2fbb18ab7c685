"""scripts/bench_compare.py: the regression gate over pytest-benchmark JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_compare.py"


def write(path, medians, commit="abc"):
    rows = [{"fullname": n, "stats": {"median": m}} for n, m in medians.items()]
    path.write_text(json.dumps({"benchmarks": rows, "commit_info": {"id": commit}}))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_within_threshold_passes_and_prints_ratios(tmp_path):
    old = write(tmp_path / "old.json", {"a": 1.0, "b": 2.0, "gone": 1.0})
    new = write(tmp_path / "new.json", {"a": 1.04, "b": 1.0, "added": 3.0})
    r = run(old, new)
    assert r.returncode == 0, r.stderr
    assert "1.040" in r.stdout and "0.500" in r.stdout
    lines = r.stdout.splitlines()
    assert any(line.startswith("gone") and "only in OLD" in line for line in lines)
    assert any(line.startswith("added") and "only in NEW" in line for line in lines)


def test_slowdown_over_threshold_fails(tmp_path):
    old = write(tmp_path / "old.json", {"a": 1.0, "b": 1.0})
    new = write(tmp_path / "new.json", {"a": 1.2, "b": 1.0})
    r = run(old, new)
    assert r.returncode == 1 and "SLOWER" in r.stdout and "slowed by more than 5%" in r.stderr
    assert run(old, new, "--threshold", "0.25").returncode == 0


def test_not_a_benchmark_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = run(bad, bad)
    assert r.returncode != 0 and str(bad) in r.stderr and "pytest-benchmark" in r.stderr


def test_real_pytest_benchmark_output(tmp_path):
    out = tmp_path / "real.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "ops" / "bench_merge_state.py"
    # an xdist worker's PYTEST_XDIST_* variables would make pytest-benchmark in the child think it is one, and skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(bench), "-k", "fwd",
                    "--benchmark-json", str(out)], capture_output=True, text=True, timeout=300,
                   cwd=tmp_path, check=True, env=env)
    r = run(out, out)
    assert r.returncode == 0 and "1.000" in r.stdout
