"""A signal mid-run: the step finishes, a checkpoint is written at it, the process exits EXIT_STOPPED, and a resume
trains on exactly as if it had never stopped (train/stop.py)."""
import signal

import pytest

from dopsd_fast.testing import metrics_rows, train_process, wait_for_rows
from dopsd_fast.train.checkpoint import list_checkpoints, read_state
from dopsd_fast.train.stop import EXIT_STOPPED

FOREVER = ["train.steps=100000", "train.checkpoint_every=100000", "train.log_every=1"]   # no scheduled save


def stop_mid_run(out, *signals: signal.Signals) -> tuple[int, str]:
    """Start a run that would not end or checkpoint on its own, send it ``signals`` back to back once it is logging
    steps; returns the last logged step and the run's output."""
    proc = train_process(out, *FOREVER)
    try:
        wait_for_rows(out, 3, proc)         # mid-run: alive (asserted while waiting), steps logged, no checkpoint
        assert list_checkpoints(out / "checkpoints") == []
        for sig in signals:
            proc.send_signal(sig)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_STOPPED, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    last = metrics_rows(out)[-1]["step"]
    assert 3 <= last < 100000
    assert any(f"dopsd: stopped by {sig.name} at step {last}; checkpoint: " in output for sig in signals), output
    checkpoints = list_checkpoints(out / "checkpoints")      # the stop's checkpoint, at the last completed step
    assert [p.name for p in checkpoints] == [f"step-{last:06d}"] and read_state(checkpoints[0])["step"] == last
    return last, output


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    stopped = tmp_path / "stopped"
    last, _ = stop_mid_run(stopped, signal.SIGTERM)

    steps = f"train.steps={last + 3}"          # resume and finish; train.steps may change on resume
    straight = tmp_path / "straight"
    resumed, proc = train_process(stopped, *FOREVER, steps), train_process(straight, *FOREVER, steps)
    assert f"resumed from {stopped / 'checkpoints'}" in resumed.communicate(timeout=600)[0]
    proc.communicate(timeout=600)
    assert resumed.returncode == proc.returncode == 0
    a, b = metrics_rows(stopped), metrics_rows(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, last + 4))
    assert [r["losses"] for r in a] == [r["losses"] for r in b]      # bit-exact on CPU


def test_a_second_signal_while_stopping_is_ignored(tmp_path):
    """Both arrive before the step ends; Python runs pending handlers by signal number, so either may come first.
    Ctrl-C raises no KeyboardInterrupt (it used to, from inside TensorBoard's writer: a traceback, no checkpoint)."""
    _, output = stop_mid_run(tmp_path / "run", signal.SIGINT, signal.SIGTERM)
    assert output.count(f"stopping after this step and its checkpoint (exit {EXIT_STOPPED})") == 1
    assert output.count("ignored: already stopping after SIG") == 1


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=lambda s: s.name)
def test_hangup_and_usr1_stop_too(tmp_path, sig):
    stop_mid_run(tmp_path / "run", sig)
