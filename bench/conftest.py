"""`pytest bench/`: throughput and memory, ours and the baseline measured in the same run."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dopsd_fast.ops._dispatch import use_backend  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu_outside_op_benches(request):
    """On CPU the end-to-end benches time the reference ops (interpreted Triton timings mean nothing there);
    op benches choose their implementation per case."""
    if "ops" in request.node.path.parts or torch.cuda.is_available():
        yield
        return
    with use_backend("reference"):
        yield
