"""The commands of README.md run as written: every command of its ```bash blocks runs on CPU, in README order, from
a folder holding the repository's configs/ (as in a checkout), through the installed `dopsd` console script, and
exits 0; or it is in SKIPPED with the reason. A new command is run or fails this test, never silently skipped."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Commands this test does not run, matched by how they start, and why.
SKIPPED = {
    "python3 -m venv": "installs, then runs `dopsd demo` or the tests: .ci/run runs these (tests/test_install.py)",
    "dopsd cache configs/zimage-turbo-lora.yaml": "needs the Z-Image-Turbo and Qwen3-VL weights",
    "torchrun": "several GPUs",
    "deepspeed --hostfile": "several nodes",
}
CONSOLE_SCRIPTS = ("dopsd", ".venv/bin/dopsd")       # the README's two spellings of the installed script


def readme_commands() -> list[list[str]]:
    """Each command of the bash blocks as its words: comments dropped, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def skip_reason(words: list[str]) -> str | None:
    command = " ".join(words)
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def test_every_skipped_command_is_in_the_readme():
    commands = [" ".join(words) for words in readme_commands()]
    for start in SKIPPED:
        assert any(c.startswith(start) for c in commands), f"SKIPPED names {start!r}, which README.md no longer has"


def test_readme_commands_run_as_written(tmp_path):
    commands = [words for words in readme_commands() if skip_reason(words) is None]
    strangers = [" ".join(w) for w in commands if w[0] not in CONSOLE_SCRIPTS]
    assert not strangers, f"README commands that are neither `dopsd ...` nor in SKIPPED: {strangers}"
    assert any(w[1:3] == ["train", "tiny-cpu"] for w in commands)     # the extraction found the "Using it" block

    exe = Path(sys.executable).with_name("dopsd")
    assert exe.exists(), "the `dopsd` console script is not installed (pip install -e .)"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")      # the continual plans
    # as a user runs them: without the Triton interpreter that tests/conftest.py turns on (20x slower on CPU)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    for words in commands:
        tic = time.perf_counter()
        proc = subprocess.run([str(exe), *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        command = " ".join(words)
        print(f"{time.perf_counter() - tic:6.1f} s  {command}")
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        # each README run has its own folder, or extends the one before it: none may find its work done already
        assert "nothing left to train" not in proc.stdout, command
