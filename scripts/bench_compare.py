#!/usr/bin/env python3
"""Compare two pytest-benchmark JSON files: `python scripts/bench_compare.py OLD.json NEW.json [--threshold 0.05]`.

Prints one row per benchmark present in both (median time old -> new, ratio) and exits 1 when any benchmark's
median slowed by more than the threshold (default 5%), 0 otherwise. Benchmarks in only one file are listed, not
judged. Rows are keyed by the benchmark's full name, so OLD and NEW must come from the same suite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def medians(path: Path) -> tuple[dict[str, float], str]:
    try:
        data = json.loads(path.read_text())
        rows = {b["fullname"]: float(b["stats"]["median"]) for b in data["benchmarks"] if b.get("stats")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"bench_compare: {path}: not a pytest-benchmark JSON file ({err}); "
                         "write one with `pytest bench --benchmark-json FILE`")
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    return rows, commit


def compare(old: dict[str, float], new: dict[str, float], threshold: float) -> tuple[list[str], list[str]]:
    """(table lines, names that slowed by more than ``threshold``)."""
    lines, slower = [], []
    width = max((len(n) for n in old.keys() | new.keys()), default=10)
    lines.append(f"{'benchmark':<{width}}  {'old (s)':>11}  {'new (s)':>11}  {'new/old':>8}")
    for name in sorted(old.keys() & new.keys()):
        ratio = new[name] / old[name] if old[name] > 0 else float("inf")
        flag = "  SLOWER" if ratio > 1 + threshold else ""
        if flag:
            slower.append(name)
        lines.append(f"{name:<{width}}  {old[name]:11.4g}  {new[name]:11.4g}  {ratio:8.3f}{flag}")
    for name in sorted(old.keys() ^ new.keys()):
        lines.append(f"{name:<{width}}  only in {'OLD' if name in old else 'NEW'}")
    return lines, slower


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--threshold", type=float, default=0.05, help="allowed slowdown of the median (0.05 = 5%%)")
    args = p.parse_args(argv)
    (old, c_old), (new, c_new) = medians(args.old), medians(args.new)
    lines, slower = compare(old, new, args.threshold)
    print(f"old {args.old} ({c_old})  new {args.new} ({c_new})  threshold {args.threshold:.0%}")
    print("\n".join(lines))
    if slower:
        print(f"{len(slower)} benchmark(s) slowed by more than {args.threshold:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
