"""Fault injection (issue 19): seeded kill points (SIGKILL in a step, in the checkpoint write, between rename and
prune, at startup), SIGTERM, NaN, a full disk, a stopped or killed rank, and bad-file corpora, each measured against
an uninterrupted run (fault_harness.py). CI runs the short list; `pytest -m faults` the long one. The session prints
the table of faults tried / survived / steps lost / rows duplicated / files corrupted (conftest.py)."""
import pytest

from fault_harness import (Fault, reference_run, ds_reference_run, registry, run_corpus, run_disk_full,
                           run_process_fault, run_rank_fault)

pytestmark = pytest.mark.faults

PROCESS = ("sigkill-step", "sigkill-save", "sigkill-prune", "sigkill-startup", "sigkill-base", "sigterm", "nan")
CORPORA = ("bad-config", "bad-data", "bad-weights", "bad-checkpoint")


def cases(points):
    return [pytest.param(f, id=f.id, marks=pytest.mark.faults(long=True) if f.long else ())
            for f in registry() if f.point in points]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted run every fault is measured against (its folder holds the corpora's sources)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, reference_run(out)


@pytest.fixture(scope="session")
def ds_reference(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return ds_reference_run(tmp_path_factory.mktemp("ds-reference") / "run")


def check(outcome, fault_log):
    fault_log.add(outcome)
    assert outcome.survived, outcome.record()


@pytest.mark.parametrize("fault", cases(PROCESS))
def test_process_fault(fault: Fault, tmp_path, reference, fault_log):
    check(run_process_fault(fault, tmp_path, reference[1]), fault_log)


@pytest.mark.parametrize("fault", cases(("disk-full",)))
def test_disk_full(fault: Fault, tmp_path, reference, fault_log):
    check(run_disk_full(fault, tmp_path, reference[1], pytest.skip), fault_log)


@pytest.mark.parametrize("fault", cases(CORPORA))
def test_bad_input(fault: Fault, tmp_path, reference, fault_log):
    check(run_corpus(fault, tmp_path, reference[0]), fault_log)


@pytest.mark.parametrize("fault", cases(("rank-stop", "rank-kill")))
def test_rank_fault(fault: Fault, tmp_path, ds_reference, fault_log):
    check(run_rank_fault(fault, tmp_path, ds_reference), fault_log)
