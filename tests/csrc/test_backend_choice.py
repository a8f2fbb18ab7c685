"""ops/_dispatch.py: auto runs each op's measured choice (CUDA_AUTO on CUDA, Triton where a cpp choice has no CUDA
build; CPU_AUTO on CPU where the extension is loaded), and a forced cpp only applies to ops that have a csrc/
implementation."""
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
@pytest.mark.parametrize("built", [True, False])
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_auto_on_cpu_runs_the_measured_choice(monkeypatch, built, interpret):
    """CPU_AUTO's C++ twins where the extension is loaded, the reference for every other op (and for those without
    the extension); Triton's interpreter only when forced, whether or not TRITON_INTERPRET is on."""
    monkeypatch.setattr(_dispatch, "native_available", lambda cuda=False: built and not cuda)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    x = torch.randn(3)
    twins = sorted(_dispatch.CPU_AUTO)
    assert twins == ["gated_residual", "modulated_rms_norm", "qk_norm_rope"]
    assert {op: backend_for(op, x) for op in twins} == {op: "cpp" if built else "reference" for op in twins}
    assert backend_for("rollout_step", x) == backend_for("merge_state", x) == "reference"
    with use_backend("reference"):
        assert backend_for("qk_norm_rope", x) == "reference"
    with use_backend("triton"):
        assert backend_for("qk_norm_rope", x) == backend_for("merge_state", x) == "triton"


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
    assert set(_dispatch.CPU_AUTO) <= _dispatch.NATIVE_OPS     # a CPU choice other than the reference is a C++ twin
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
