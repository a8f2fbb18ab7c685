"""`pytest bench/`: throughput and memory, ours and the baseline measured in the same run."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _cpu_ops_outside_op_benches(request, monkeypatch):
    """On CPU the end-to-end benches run what a CPU user's ``auto`` runs (the C++ twins of ops/_dispatch.py's
    CPU_AUTO, the reference for the rest), not Triton's interpreter, whose timings mean nothing; op benches choose
    their implementation per case."""
    if "ops" not in request.node.path.parts and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield
