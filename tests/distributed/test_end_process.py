"""distributed.end_process: a process that joined a process group exits with its code and what it printed, without
the interpreter's teardown (where gloo's worker threads, kept alive by DeepSpeed's references, aborted a finished
rank: see end_process); one that did not exits as usual. cli.run, the `dopsd` command, ends through it."""
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from ds_launch import rank_env  # noqa: E402
from dopsd_fast import cli  # noqa: E402

CHILD = """
import atexit, sys
import deepspeed.comm
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
from dopsd_fast.train.distributed import destroy_process_group, end_process, init_process_group
atexit.register(lambda: open(sys.argv[1], "w").close())     # stands for the interpreter's teardown
if sys.argv[2] == "joined":
    init_process_group(timeout_s=30)
    destroy_process_group()
sys.stdout.write("printed, not flushed")        # stdout is a pipe here: block-buffered until a flush
end_process(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_end_process_exits_with_the_code_and_skips_the_teardown_only_after_joining(tmp_path, joined):
    marker = tmp_path / "teardown-ran"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(marker), "joined" if joined else "alone"],
                          env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "printed, not flushed"
    assert marker.exists() is not joined


def test_run_ends_through_end_process_with_mains_code_or_1_after_an_exception(monkeypatch, capsys):
    codes = []
    monkeypatch.setattr(cli, "end_process", codes.append)
    monkeypatch.setattr(cli, "main", lambda argv: 5)
    cli.run([])
    monkeypatch.setattr(cli, "main", lambda argv: 1 / 0)
    cli.run([])
    assert codes == [5, 1]
    assert "ZeroDivisionError" in capsys.readouterr().err
