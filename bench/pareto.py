"""The speed-per-memory-budget comparison of bench_e2e.py, on plain records (no torch: tests and scripts read it).

A *run* is one configuration of one side measured in the bench (a dict):

    label        "ours ckpt=none ops=auto", "baseline ckpt=on sdpa=flash", "patched ckpt=on attn=sdpa"
    side         "ours" | "baseline" | "patched" (the baseline's loop after apply_dopsd_kernels; optional)
    status       "ok" | "out of memory" | "refused" (an SDPA backend that has no kernel for the shape) | "error"
    seconds      wall seconds of its timed iterations, in round order (warm-up excluded)
    peak_bytes   resident + transient (None when it did not run to the end)
    losses       [iteration][roll-out step] of its first iterations, all started from the same state and noise
    grad_norms   [iteration]: the clip_grad_norm_ return value

``pareto`` picks, for each memory budget, each side's fastest run (median seconds) whose peak fits, and the ratio
of the two (and, where patched runs exist, the patched side's fastest, its speed over the baseline's and ours over
it); a side with nothing that fits "does not fit". ``equivalence`` compares every run's losses and grad norms
with the reference run's; ``render`` prints both tables.
"""
from __future__ import annotations

import statistics

DOES_NOT_FIT = "does not fit"


def median_seconds(run: dict) -> float:
    return statistics.median(run["seconds"])


def fits(run: dict, budget: int | None) -> bool:
    """``budget``: bytes, or None for no limit beyond the device's own (a run that ran out of memory never fits)."""
    if run["status"] != "ok" or not run["seconds"] or run.get("peak_bytes") is None:
        return False
    return budget is None or run["peak_bytes"] <= budget


def fastest_that_fits(runs: list[dict], side: str, budget: int | None) -> dict | None:
    candidates = [r for r in runs if r["side"] == side and fits(r, budget)]
    return min(candidates, key=median_seconds, default=None)


def round_ratios(baseline: dict, ours: dict) -> list[float]:
    """Speed ratio ours/baseline per round: baseline seconds / ours seconds of the same round index."""
    return [b / o for b, o in zip(baseline["seconds"], ours["seconds"])]


def pareto(runs: list[dict], budgets: list[tuple[str, int | None]]) -> list[dict]:
    """One row per budget ``(name, bytes or None)``: each side's fastest run that fits and, where both sides fit,
    the speed ratio ours/baseline: of the median seconds (the headline), min / median / max over rounds, and of
    the median process CPU seconds (steadier than wall time on a shared machine)."""
    rows = []
    sides = ("ours", "baseline", "patched") if any(r["side"] == "patched" for r in runs) else ("ours", "baseline")
    for name, budget in budgets:
        row: dict = {"budget": name, "budget_bytes": budget}
        chosen = {side: fastest_that_fits(runs, side, budget) for side in sides}
        for side, run in chosen.items():
            row[side] = run["label"] if run else DOES_NOT_FIT
            row[f"{side}_it_per_s"] = 1 / median_seconds(run) if run else None
            row[f"{side}_peak_bytes"] = run["peak_bytes"] if run else None
        if chosen["ours"] and chosen["baseline"]:
            ratios = round_ratios(chosen["baseline"], chosen["ours"])
            row["speedup_min_median_max"] = [min(ratios), statistics.median(ratios), max(ratios)]
            row["speedup_of_medians"] = median_seconds(chosen["baseline"]) / median_seconds(chosen["ours"])
            cpu = [statistics.median(chosen[s]["cpu_seconds"]) if chosen[s].get("cpu_seconds") else None
                   for s in ("baseline", "ours")]
            row["cpu_seconds_ratio"] = cpu[0] / cpu[1] if None not in cpu else None
        else:
            row["speedup_min_median_max"] = row["speedup_of_medians"] = row["cpu_seconds_ratio"] = None
        if "patched" in sides:
            p, b, o = chosen["patched"], chosen["baseline"], chosen["ours"]
            row["patched_speedup_of_medians"] = median_seconds(b) / median_seconds(p) if p and b else None
            row["ours_over_patched"] = median_seconds(p) / median_seconds(o) if p and o else None
        rows.append(row)
    return rows


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time a device ran at least one kernel."""
    busy, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return busy


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def equivalence(runs: list[dict], reference: dict, loss_rel: float, grad_norm_rel: float) -> list[str]:
    """Writes ``loss_max_rel_diff`` / ``grad_norm_max_rel_diff`` into every run that has its first iterations and
    returns one line per failure: a run outside a tolerance, an errored run, a run with fewer iterations."""
    failures = []
    n = len(reference["grad_norms"])
    for run in runs:
        if run["status"] == "error":
            failures.append(f"{run['label']}: {run.get('why', 'error')}")
            continue
        if run["status"] != "ok":
            continue
        if len(run["grad_norms"]) != n or len(run["losses"]) != n:
            failures.append(f"{run['label']}: {len(run['grad_norms'])} iterations, the reference has {n}")
            continue
        run["loss_max_rel_diff"] = max(rel_diff(a, b) for it, ref in zip(run["losses"], reference["losses"])
                                       for a, b in zip(it, ref, strict=True))
        run["grad_norm_max_rel_diff"] = max(rel_diff(a, b) for a, b in zip(run["grad_norms"], reference["grad_norms"]))
        if run["loss_max_rel_diff"] > loss_rel or run["grad_norm_max_rel_diff"] > grad_norm_rel:
            failures.append(f"{run['label']}: losses rel {run['loss_max_rel_diff']:.2e} (tolerance {loss_rel:.0e}), "
                            f"grad norms rel {run['grad_norm_max_rel_diff']:.2e} (tolerance {grad_norm_rel:.0e}) "
                            f"vs {reference['label']}")
    return failures


def size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def render(runs: list[dict], rows: list[dict], header: list[str]) -> list[str]:
    """The two tables as text lines: every run (time, memory, equivalence), then fastest-that-fits per budget."""
    width = max(len(r["label"]) for r in runs) if runs else 10
    lines = [*header,
             f"{'configuration':<{width}}  {'status':<13} {'it/s':>7} {'s/it median (min-max)':>22} {'CPU s/it':>8} "
             f"{'peak = resident + transient':>38} {'loss rel':>9} {'gnorm rel':>9} {'MFU':>6}"]
    for r in runs:
        if r["status"] == "ok" and r["seconds"]:
            s = r["seconds"]
            time = f"{1 / median_seconds(r):>7.3f} {f'{statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f})':>22}"
            cpu = f"{statistics.median(r['cpu_seconds']):>8.3f}" if r.get("cpu_seconds") else f"{'-':>8}"
        else:
            time, cpu = f"{'-':>7} {'-':>22}", f"{'-':>8}"
        mem = (f"{size(r.get('peak_bytes'))} = {size(r.get('resident_bytes'))} + {size(r.get('transient_bytes'))}"
               if r.get("peak_bytes") is not None else "-")
        eq = [f"{r[k]:.1e}" if r.get(k) is not None else "-" for k in ("loss_max_rel_diff", "grad_norm_max_rel_diff")]
        if r.get("reference"):
            eq = ["reference", "reference"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None and r["status"] == "ok" and r["seconds"] else "-"
        lines.append(f"{r['label']:<{width}}  {r['status']:<13} {time} {cpu} {mem:>38} {eq[0]:>9} {eq[1]:>9} {mfu:>6}")
        if r["status"] != "ok" and r.get("why"):
            lines.append(f"{'':<{width}}    {r['why'][:160]}")
    lines.append("")
    patched = bool(rows) and "patched" in rows[0]
    sides = ("ours", "baseline", "patched") if patched else ("ours", "baseline")
    lines.append(f"{'memory budget':<24} " + "".join(f"{f'{side}: fastest that fits':<{width + 24}}" for side in sides)
                 + "speed ours/baseline: of medians (rounds min/median/max; CPU s)"
                 + ("; patched/baseline; ours/patched" if patched else ""))
    for row in rows:
        cells = []
        for side in sides:
            if row[f"{side}_it_per_s"] is None:
                cells.append(f"{DOES_NOT_FIT:<{width + 23}}")
            else:
                cells.append(f"{row[side]:<{width}} {row[f'{side}_it_per_s']:>6.3f} it/s "
                             f"{size(row[f'{side}_peak_bytes']):>10}")
        if row["speedup_min_median_max"]:
            ratio = (f"{row['speedup_of_medians']:.2f} (" + "/".join(f"{x:.2f}" for x in row["speedup_min_median_max"])
                     + (f"; {row['cpu_seconds_ratio']:.2f}" if row["cpu_seconds_ratio"] else "") + ")")
        elif row["ours_it_per_s"] is not None:
            ratio = "ours only"
        elif row["baseline_it_per_s"] is not None:
            ratio = "baseline only"
        else:
            ratio = "neither fits"
        if patched:
            ratio += "".join(f"; {row[k]:.2f}" if row[k] is not None else "; -"
                             for k in ("patched_speedup_of_medians", "ours_over_patched"))
        lines.append(f"{row['budget']:<24} " + " ".join(cells) + f" {ratio}")
    profiled = [r for r in runs if r.get("profile") and r["seconds"]]
    if profiled:
        lines += ["", f"{'profiled iteration':<{width}}  {'kernels':>8} {'GPU busy s':>10} {'median s':>9} "
                      f"{'GPU waits on host':>17}"]
        for r in profiled:
            busy, med = r["profile"]["gpu_busy_s"], statistics.median(r["seconds"])
            lines.append(f"{r['label']:<{width}}  {r['profile']['kernels']:>8} {busy:>10.3f} {med:>9.3f} "
                         f"{max(med - busy, 0.0) / med:>17.0%}")
    return lines
