"""ops/_dispatch.py with the cpp backend: auto prefers the extension's CUDA kernels, keeps today's CPU choice, and a
forced cpp only applies to ops that have a csrc/ implementation."""
from types import SimpleNamespace

import pytest
import torch

from dopsd_fast.ops import _dispatch
from dopsd_fast.ops._dispatch import backend_for, use_backend

CUDA_TENSOR = SimpleNamespace(is_cuda=True)   # backend_for only asks where a tensor lives


@pytest.mark.fused   # no reference pinning from tests/conftest.py: these tests choose backends themselves
def test_auto_on_cpu_is_unchanged(monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(x, native=True) == backend_for(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for(x, native=True) == backend_for(x) == "reference"


@pytest.mark.fused
@pytest.mark.parametrize("built_with_cuda", [True, False])
def test_auto_on_cuda_prefers_the_extension(monkeypatch, built_with_cuda):
    monkeypatch.setattr(_dispatch, "native_available", lambda cuda=False: built_with_cuda or not cuda)
    assert backend_for(CUDA_TENSOR, native=True) == ("cpp" if built_with_cuda else "triton")
    assert backend_for(CUDA_TENSOR) == "triton"   # ops without a csrc/ kernel


@pytest.mark.fused
def test_forced_cpp(monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("cpp"):
        assert backend_for(x, native=True) == "cpp"
        assert backend_for(x) == "reference"   # no csrc/ kernel: the auto choice
    monkeypatch.setenv("DOPSD_BACKEND", "cpp")
    assert backend_for(x, native=True) == "cpp"
    monkeypatch.setattr(_dispatch, "native_available", lambda cuda=False: False)
    with pytest.raises(RuntimeError, match="'cpp' was forced"):
        backend_for(x, native=True)
    with pytest.raises(ValueError, match="expected one of"):
        with use_backend("cuda"):
            pass
