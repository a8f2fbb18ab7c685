#!/usr/bin/env python3
"""Summarise a scripts/device_check.sh output folder: `python scripts/summarize_bench.py OUT_DIR`.

Reads OUT_DIR/stages.tsv (stage, exit code, seconds, note), the pytest JUnit files tests_*.xml, and the
pytest-benchmark files bench_ops.json and bench_e2e*.json, and bench_24gb.json (the mem24 stage's verdicts); prints
one table per kind, the e2e one last, and writes the same text to OUT_DIR/summary.txt. An e2e record of
bench/bench_e2e.py's Pareto bench prints the bench's own tables (every configuration, then the fastest of each side
that fits each memory budget); an older one-pair record (before 2026-12) prints one line. Missing files are
reported as missing, never fatal: the summary is what a failed run still has to show.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def stage_lines(out: Path) -> list[str]:
    path = out / "stages.tsv"
    if not path.is_file():
        return ["(no stages.tsv)"]
    lines = [f"{'stage':<16} {'rc':>4} {'seconds':>8}  note"]
    for row in path.read_text().splitlines():
        name, rc, sec, *note = row.split("\t") + [""]
        flag = "" if rc in ("0", "skip") else "  FAILED" if rc != "124" else "  TIMED OUT"
        lines.append(f"{name:<16} {rc:>4} {sec:>8}  {note[0]}{flag}")
    return lines


def test_lines(out: Path) -> list[str]:
    paths = sorted(out.glob("tests_*.xml"))
    if not paths:
        return ["(no tests_*.xml: the optional ops / csrc stages did not run)"]
    lines = [f"{'tests':<14} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}"]
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            lines.append(f"{path.stem:<14} unreadable ({err})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        lines.append(f"{path.stem[6:]:<14} {passed:>7} {n['failures']:>7} {n['errors']:>7} {n['skipped']:>8}")
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                lines.append(f"    FAILED {case.get('classname', '')}::{case.get('name', '')}")
    return lines


def _load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["benchmarks"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        return [{"name": f"{path.name}: unreadable ({err})", "extra_info": {}}]


def e2e_lines(out: Path) -> list[str]:
    paths = sorted(out.glob("bench_e2e*.json"))
    if not paths:
        return ["(no bench_e2e*.json)"]
    tables, pairs = [], []
    for b in (b for path in paths for b in _load(path)):
        e = b.get("extra_info", {})
        if "pareto_table" in e:
            failures = e.get("equivalence", {}).get("failures") or []
            tables.append([*e["pareto_table"], *(f"EQUIVALENCE FAILED {f}" for f in failures)])
        else:
            pairs.append(b)
    lines = _pair_lines(pairs) if pairs else []
    for table in tables:
        lines += [""] * bool(lines) + table
    return lines


def _pair_lines(benchmarks: list[dict]) -> list[str]:
    """Records of the older one-pair bench (ours vs the baseline, one configuration each)."""
    lines = [f"{'case':<20} {'device':<22} {'ours it/s':>9} {'base it/s':>9} {'speedup min/med/max':>20} "
             f"{'peak MiB ours/base':>19} {'mem ratio':>9} {'MFU ours/base':>14}"]
    for b in benchmarks:
        e = b.get("extra_info", {})
        if "ours" not in e:
            lines.append(f"{b.get('name', '?')}: no measurements")
            continue
        o, s = e["ours"], e["baseline"]
        sp = "/".join(f"{r:.2f}" for r in e["speedup_min_median_max"])
        mib = f"{o['peak_bytes'] / 2**20:.0f}/{s['peak_bytes'] / 2**20:.0f}"
        lines.append(f"{e['case']:<20} {e['device'][:22]:<22} {o['it_per_s']:>9.3f} {s['it_per_s']:>9.3f} {sp:>20} "
                     f"{mib:>19} {e['peak_memory_ratio_ours_over_baseline']:>9.2f} "
                     f"{o['mfu']:>6.1%}/{s['mfu']:.1%}")
    return lines


def op_lines(out: Path) -> list[str]:
    path = out / "bench_ops.json"
    if not path.is_file():
        return ["(no bench_ops.json)"]
    lines = [f"{'op bench':<72} {'median ms':>10}  rate"]
    for b in _load(path):
        stats, e = b.get("stats") or {}, b.get("extra_info", {})
        rate = " ".join(f"{e[k]:.1f} {k}" for k in ("TFLOP/s", "GB/s") if k in e)
        median = f"{stats['median'] * 1e3:10.3f}" if "median" in stats else f"{'-':>10}"
        lines.append(f"{b.get('name', '?')[:72]:<72} {median}  {rate}")
    return lines


def mem24_lines(out: Path) -> list[str]:
    """bench/bench_24gb.py's verdict per configuration (the optional mem24 stage); nothing when it did not run."""
    path = out / "bench_24gb.json"
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"bench_24gb.json: unreadable ({err})"]
    cap = f"{report['cap_gib']:g} GiB cap on {report.get('device', '?')}" if report.get("cap_gib") else "no cap (CPU)"
    return [f"24 GiB check ({cap}, {report.get('iterations', '?')} iterations each):",
            *(f"  {line}" for line in report.get("summary", []))]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0])
    parts = [p for p in (stage_lines(out), test_lines(out), op_lines(out), mem24_lines(out), e2e_lines(out)) if p]
    text = "\n\n".join("\n".join(p) for p in parts)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
