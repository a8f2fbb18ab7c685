"""2 CPU ranks over gloo, ZeRO-2: SIGTERM to one rank's process stops both at the same step, with one complete
checkpoint there (the save is collective, so the ranks agree on the step first: train/stop.py)."""
import signal

import pytest

pytest.importorskip("deepspeed")

from ds_launch import bare_ranks, logged_rows  # noqa: E402
from dopsd_fast.testing import wait_for_rows  # noqa: E402
from dopsd_fast.train.checkpoint import list_checkpoints, read_state  # noqa: E402
from dopsd_fast.train.stop import EXIT_STOPPED  # noqa: E402


def test_signal_to_one_rank_stops_both_at_one_checkpoint(tmp_path):
    out = tmp_path / "run"
    ranks = bare_ranks(out, "train.steps=100000", "train.checkpoint_every=100000", "deepspeed.stage=2",
                       "deepspeed.timeout_s=60", "train.report_to=[jsonl]")
    try:
        wait_for_rows(out, 2, ranks[0])             # mid-run, no checkpoint yet
        assert ranks[1].poll() is None and list_checkpoints(out / "checkpoints") == []
        ranks[1].send_signal(signal.SIGTERM)        # that rank's process only, not the whole group
        outputs = [p.communicate(timeout=300)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in ranks] == [EXIT_STOPPED] * 2, [o[-3000:] for o in outputs]
    last = max(logged_rows(out))
    assert "dopsd: SIGTERM: stopping after this step" in outputs[1]
    assert f"dopsd: stopped by a signal to another rank at step {last}; checkpoint: " in outputs[0]
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    assert checkpoint.name == f"step-{last:06d}" and read_state(checkpoint)["step"] == last
    assert sorted(p.name for p in checkpoint.glob("rng-rank*")) == ["rng-rank00000.safetensors",
                                                                   "rng-rank00001.safetensors"]
