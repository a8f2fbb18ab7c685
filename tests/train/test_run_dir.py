"""One run per output_dir (its lock), and a resume after a crash leaves the logs of an uninterrupted run
(train/run_dir.py)."""
import json
import signal
import socket

import pytest

from dopsd_fast.cli import main
from dopsd_fast.testing import metrics_rows, train_process, wait_for_rows
from dopsd_fast.train.checkpoint import list_checkpoints
from dopsd_fast.train.run_dir import drop_rows_after

FOREVER = ["train.steps=100000", "train.log_every=1"]


def kill_mid_run(out, rows: int, *overrides: str) -> None:
    """SIGKILL a run that would not end on its own once it has logged ``rows`` steps (alive until then)."""
    proc = train_process(out, *FOREVER, *overrides)
    try:
        wait_for_rows(out, rows, proc)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL       # killed mid-run, not finished or failed


def measured(key: str) -> bool:
    """Row fields that time or measure the process (they differ between any two runs)."""
    return key == "sec" or key.endswith("_s") or key.startswith(("mfu", "gpu_")) or key == "peak_mem_gib"


def test_resume_after_sigkill_logs_each_step_once(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    kill_mid_run(killed, 6, "train.checkpoint_every=4")       # a checkpoint at 4, rows logged past it
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-000004"]
    assert metrics_rows(killed)[-1]["step"] > 4

    runs = [train_process(out, "train.steps=10", "train.checkpoint_every=4") for out in (killed, straight)]
    assert all(p.communicate(timeout=600)[0] and p.returncode == 0 for p in runs)
    a, b = metrics_rows(killed), metrics_rows(straight)
    assert [r["step"] for r in a] == list(range(1, 11))
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    assert [{k: v for k, v in r.items() if not measured(k)} for r in a] == \
           [{k: v for k, v in r.items() if not measured(k)} for r in b]       # bit-exact on CPU

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    losses = []
    for out in (killed, straight):      # TensorBoard hides the killed run's events past the checkpoint it resumed
        events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        losses.append([(e.step, e.value) for e in events.Scalars("loss")])
    assert [s for s, _ in losses[0]] == list(range(1, 11)) and losses[0] == losses[1]


def test_drop_rows_after_cuts_the_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    drop_rows_after(2, log, tmp_path / "absent.jsonl")
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_second_run_on_a_locked_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = train_process(out, *FOREVER, "train.checkpoint_every=2")
    try:
        wait_for_rows(out, 3, holder)       # alive, mid-run, checkpoint 2 written
        holder.send_signal(signal.SIGSTOP)  # frozen, lock held: whatever changes now is the second run's doing
        before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        capsys.readouterr()
        assert main(["train", "--no-samples", "--no-progress", "--set", f"train.output_dir={out}",
                     "--set", "train.steps=100000"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dopsd: error: {out}: another run is training into this folder "
                              f"(host {socket.gethostname()} pid {holder.pid}, holding {out / '.lock'})")
        assert "--set train.output_dir=NEW_DIR" in err and "Traceback" not in err
        assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before     # nothing written
    finally:
        holder.kill()                       # SIGKILL: the lock is never released by the run itself
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL

    last = list_checkpoints(out / "checkpoints")[-1]
    step = int(last.name.split("-")[1])
    assert main(["train", "--no-samples", "--no-progress", "--set", f"train.output_dir={out}",
                 "--set", f"train.steps={step + 1}"]) == 0     # the dead run's lock is gone with its process
    assert f"resumed from {last} at step {step}" in capsys.readouterr().out
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, step + 2))
