"""Shared test setup. The package is tested as installed (`pip install -e .`), never via sys.path tricks."""
import os

# Triton kernels must see the interpreter flag before any @triton.jit runs (there is no GPU in CI).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dopsd_fast.ops._dispatch import use_backend  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of `pytest -n N`'s workers: one thread each, and for the processes its tests start (OpenMP threads of
    # several processes spinning on 2 cores slow every one of them several-fold)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _reference_ops_outside_op_tests(request):
    """Model, method and trainer tests run the PyTorch reference ops (auto would run the C++ epilogues on CPU),
    the numerics their independent references are written in. Op tests (tests/ops) force each backend themselves,
    and tests that compare the fused path with the reference ask for it explicitly."""
    if "ops" in request.node.path.parts or request.node.get_closest_marker("fused"):
        yield
        return
    with use_backend("reference"):
        yield


def _op_test_devices() -> list[str]:
    """Where op tests run: CPU always (Triton under the interpreter, as in CI) and CUDA when there is a GPU. With
    the interpreter off (scripts/device_check.sh sets TRITON_INTERPRET=0) Triton takes no CPU tensors: CUDA only."""
    if not torch.cuda.is_available():
        return ["cpu"]
    return ["cpu", "cuda"] if os.environ.get("TRITON_INTERPRET") == "1" else ["cuda"]


@pytest.fixture(params=_op_test_devices())
def device(request):
    """The device an op test runs on; the test body's tensor factories and generators default to it."""
    with torch.device(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="CPU-only op test (Triton interpreter): runs in CI, not on the GPU machine")
    for item in items:
        if item.path.relative_to(config.rootpath).parts[:2] == ("tests", "ops") and "device" not in item.fixturenames:
            item.add_marker(skip)
