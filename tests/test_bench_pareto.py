"""bench/pareto.py: fastest-that-fits per memory budget and the equivalence check of bench/bench_e2e.py, on
hand-made records (no model, no timing)."""
from pathlib import Path

import pytest

from dopsd_fast.testing import module_from_file

PARETO = Path(__file__).resolve().parents[1] / "bench" / "pareto.py"


P = module_from_file(PARETO)
MiB = 2**20


def run(label, side, seconds, peak, status="ok", losses=((0.5, 0.25),), norms=(1.0,)):
    return {"label": label, "side": side, "status": status, "seconds": list(seconds), "cpu_seconds": list(seconds),
            "peak_bytes": peak * MiB if status == "ok" else None, "resident_bytes": 10 * MiB,
            "transient_bytes": (peak - 10) * MiB if status == "ok" else None,
            "losses": [list(x) for x in losses], "grad_norms": list(norms)}


RUNS = [
    run("baseline ckpt=on", "baseline", [2.0, 2.2, 1.8], 50),
    run("baseline ckpt=off", "baseline", [1.6, 1.6, 1.6], 180),
    run("baseline ckpt=off sdpa=flash", "baseline", [], None, status="out of memory"),
    run("ours ckpt=full", "ours", [1.8, 2.0, 2.0], 45),
    run("ours ckpt=none", "ours", [1.0, 1.1, 0.9], 73),
]


def test_fastest_that_fits_per_budget_and_ratio():
    rows = P.pareto(RUNS, [("40", 40 * MiB), ("48", 48 * MiB), ("60", 60 * MiB), ("200", 200 * MiB), ("all", None)])
    by = {r["budget"]: r for r in rows}
    assert by["40"]["ours"] == by["40"]["baseline"] == P.DOES_NOT_FIT and by["40"]["speedup_of_medians"] is None
    assert by["48"]["ours"] == "ours ckpt=full" and by["48"]["baseline"] == P.DOES_NOT_FIT
    assert (by["60"]["ours"], by["60"]["baseline"]) == ("ours ckpt=full", "baseline ckpt=on")
    assert by["60"]["speedup_of_medians"] == pytest.approx(2.0 / 2.0)
    # per round: baseline seconds / ours seconds of the same round
    assert by["60"]["speedup_min_median_max"] == pytest.approx([1.8 / 2.0, 2.2 / 2.0, 2.0 / 1.8])
    # the out-of-memory run never fits, even without a limit; the faster fitting one wins
    assert (by["all"]["ours"], by["all"]["baseline"]) == ("ours ckpt=none", "baseline ckpt=off")
    assert by["all"]["speedup_of_medians"] == pytest.approx(1.6 / 1.0)
    assert by["200"]["baseline_peak_bytes"] == 180 * MiB
    text = "\n".join(P.render(RUNS, rows, ["header"]))
    assert "does not fit" in text and "ours only" in text and "neither fits" in text and "out of memory" in text
    assert text.splitlines()[0] == "header"


def test_patched_side_gets_its_own_column_and_ratios():
    """The released loop after apply_dopsd_kernels is a third side: its fastest fitting run per budget, its speed
    over the baseline's and ours over it; the ours/baseline columns are unchanged."""
    runs = [*RUNS, run("patched ckpt=on attn=sdpa", "patched", [1.6, 1.6, 1.6], 50),
            run("patched ckpt=off attn=sdpa", "patched", [1.25, 1.25, 1.25], 170)]
    rows = P.pareto(runs, [("60", 60 * MiB), ("all", None)])
    by = {r["budget"]: r for r in rows}
    assert by["60"]["patched"] == "patched ckpt=on attn=sdpa" and by["all"]["patched"] == "patched ckpt=off attn=sdpa"
    assert by["60"]["patched_speedup_of_medians"] == pytest.approx(2.0 / 1.6)
    assert by["60"]["ours_over_patched"] == pytest.approx(1.6 / 2.0)
    assert by["all"]["patched_speedup_of_medians"] == pytest.approx(1.6 / 1.25)
    assert by["all"]["ours_over_patched"] == pytest.approx(1.25 / 1.0)
    two_sides = P.pareto(RUNS, [("60", 60 * MiB), ("all", None)])
    assert [{k: r[k] for k in two_sides[0]} for r in rows] == two_sides
    assert "patched" not in P.pareto(RUNS, [("all", None)])[0]      # no patched runs: no patched column
    text = P.render(runs, rows, ["header"])
    assert "patched: fastest that fits" in text[-3] and text[-1].endswith("; 1.28; 1.25")


def test_equivalence_flags_a_configuration_that_computes_something_else():
    ref = run("baseline ckpt=on", "baseline", [1.0], 50, losses=[(0.5, 0.25), (0.4, 0.2)], norms=[1.0, 0.9])
    close = run("ours ckpt=full", "ours", [1.0], 45, losses=[(0.50001, 0.25), (0.4, 0.2)], norms=[1.0, 0.90001])
    wrong_loss = run("ours ckpt=none", "ours", [0.5], 70, losses=[(0.5, 0.25), (0.45, 0.2)], norms=[1.0, 0.9])
    wrong_norm = run("ours ckpt=selective", "ours", [0.5], 60, losses=[(0.5, 0.25), (0.4, 0.2)], norms=[1.0, 0.5])
    short = run("ours ops=triton", "ours", [0.5], 60, losses=[(0.5, 0.25)], norms=[1.0])
    oom = run("baseline ckpt=off", "baseline", [], None, status="out of memory")
    broken = {**run("ours ckpt=x", "ours", [], None, status="error"), "why": "ValueError: boom"}
    failures = P.equivalence([ref, close, wrong_loss, wrong_norm, short, oom, broken], ref, 1e-4, 1e-4)
    assert ref["loss_max_rel_diff"] == 0.0 and close["loss_max_rel_diff"] == pytest.approx(2e-5)
    assert close["grad_norm_max_rel_diff"] == pytest.approx(1e-5 / 0.9)
    named = "\n".join(failures)
    assert len(failures) == 4
    for label in ("ours ckpt=none", "ours ckpt=selective", "ours ops=triton", "ours ckpt=x: ValueError: boom"):
        assert label in named
    assert "ours ckpt=full" not in named and "baseline ckpt=off" not in named   # out of memory is recorded, not failed


def test_busy_seconds_is_the_union_of_kernel_intervals():
    assert P.busy_seconds([]) == 0.0
    # overlapping (two streams), nested, touching and disjoint intervals, unsorted
    assert P.busy_seconds([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (1.5, 2.5), (3.0, 4.0), (10.0, 11.0)]) == 7.0


def test_profiled_runs_add_a_table_of_gpu_busy_time():
    runs = [dict(r) for r in RUNS]
    runs[4]["profile"] = {"kernels": 1234, "gpu_busy_s": 0.6, "profiled_wall_s": 1.5}
    text = "\n".join(P.render(runs, P.pareto(runs, [("all", None)]), ["header"]))
    line = next(l for l in text.splitlines() if l.startswith("ours ckpt=none") and "1234" in l)
    assert line.split()[-4:] == ["1234", "0.600", "1.000", "40%"]     # median 1.0 s, 0.4 s waiting on the host
