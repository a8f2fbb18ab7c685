"""2 CPU ranks over gloo, ZeRO-2, deepspeed.timeout_s=10: a peer stopped (SIGSTOP: sockets open, nothing sent; gloo
waits in the all-reduce forever) or killed mid-run ends the survivor within timeout_s + 30 s (train/watchdog.py)."""
import signal
import time

import pytest

pytest.importorskip("deepspeed")

from ds_launch import bare_ranks  # noqa: E402
from dopsd_fast.testing import metrics_rows, wait_for_rows  # noqa: E402
from dopsd_fast.train.watchdog import EXIT_HUNG  # noqa: E402

TIMEOUT_S = 10


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_hung_or_dead_peer_ends_the_survivor_within_timeout(tmp_path, sig):
    out = tmp_path / "run"
    ranks = bare_ranks(out, "train.steps=100000", "train.checkpoint_every=100000", "deepspeed.stage=2",
                       f"deepspeed.timeout_s={TIMEOUT_S}", "train.report_to=[jsonl]")
    try:
        wait_for_rows(out, 3, ranks[0])             # mid-run: past startup, both ranks stepping
        assert ranks[1].poll() is None
        rows = len(metrics_rows(out))
        ranks[1].send_signal(sig)                   # that rank's process only
        tic = time.monotonic()
        survivor = ranks[0].communicate(timeout=TIMEOUT_S + 30)[0]
        took = time.monotonic() - tic
        peer = ranks[1].poll() if sig == signal.SIGSTOP else ranks[1].wait(5)
        assert peer == (None if sig == signal.SIGSTOP else -signal.SIGKILL)     # still stopped / killed by us
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"{sig.name}: rank 0 exited {ranks[0].returncode} after {took:.1f} s ({rows} rows before the signal)")
    assert len(metrics_rows(out)) <= rows + 1       # the run did not go on without its peer
    if sig == signal.SIGSTOP:                       # the hang: only the watchdog ends it, after timeout_s
        assert ranks[0].returncode == EXIT_HUNG, survivor[-3000:]
        assert took >= TIMEOUT_S - 1
        assert "dopsd: error: rank 0: no progress for" in survivor and "a peer rank died or hangs" in survivor
    else:                                           # gloo fails at once on the closed socket, or the watchdog
        assert ranks[0].returncode not in (0, None), survivor[-3000:]
