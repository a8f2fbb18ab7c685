"""ops/_dispatch.py: auto on CUDA runs each op's measured choice (CUDA_AUTO, Triton where a cpp choice has no CUDA
build), keeps the CPU choice, and a forced cpp only applies to ops that have a csrc/ implementation."""
import importlib
import inspect
import re
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
    assert backend_for("rollout_step", x) == backend_for("merge_state", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for("rollout_step", x) == backend_for("merge_state", x) == "reference"


@pytest.mark.fused
@pytest.mark.parametrize("built_with_cuda", [True, False])
def test_auto_on_cuda_runs_the_measured_choice(monkeypatch, built_with_cuda):
    monkeypatch.setattr(_dispatch, "native_available", lambda cuda=False: built_with_cuda or not cuda)
    assert backend_for("rollout_step", CUDA_TENSOR) == ("cpp" if built_with_cuda else "triton")
    assert backend_for("merge_state", CUDA_TENSOR) == "triton"
    assert backend_for("packed_attention", CUDA_TENSOR) == "reference"      # SDPA
    assert backend_for("ema_update_fp32", CUDA_TENSOR) == "reference"       # torch._foreach_lerp_


def test_every_op_has_a_measured_choice():
    used = set()
    for name in ("rollout_step", "lora_linear", "merge_state", "packed_attention", "ema_update", "epilogues"):
        source = inspect.getsource(importlib.import_module(f"dopsd_fast.ops.{name}"))
        used |= set(re.findall(r'backend_for\(\s*"(\w+)"', source))
    assert used <= set(_dispatch.CUDA_AUTO) and _dispatch.NATIVE_OPS <= set(_dispatch.CUDA_AUTO)
    assert {"rollout_step", "lora_linear", "merge_state", "packed_attention", "qk_norm_rope"} <= used


@pytest.mark.fused
def test_forced_cpp(monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("cpp"):
        assert backend_for("rollout_step", x) == "cpp"
        assert backend_for("merge_state", x) == "reference"   # no csrc/ kernel: the auto choice
    monkeypatch.setenv("DOPSD_BACKEND", "cpp")
    assert backend_for("rollout_step", x) == "cpp"
    monkeypatch.setattr(_dispatch, "native_available", lambda cuda=False: False)
    with pytest.raises(RuntimeError, match="'cpp' was forced"):
        backend_for("rollout_step", x)
    with pytest.raises(ValueError, match="expected one of"):
        with use_backend("cuda"):
            pass
