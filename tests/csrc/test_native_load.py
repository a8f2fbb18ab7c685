"""dopsd_fast._C is built against the torch that runs it (csrc/find_torch.py) and says so; an extension built against
another torch is not used: one one-line warning, and the ops fall back to Triton / the reference."""
import warnings
from types import SimpleNamespace

import pytest
import torch

from dopsd_fast.ops import _dispatch
from dopsd_fast.ops._dispatch import backend_for, native_available, use_backend


def test_extension_reports_the_running_torch():
    assert native_available()
    assert _dispatch.built_torch_version() == torch.__version__


@pytest.fixture
def reload_native():
    """_load_native runs once per process: clear it around a test that loads the extension again."""
    _dispatch._load_native.cache_clear()
    yield
    _dispatch._load_native.cache_clear()


@pytest.mark.fused   # chooses backends itself (no reference pinning from tests/conftest.py)
def test_another_torch_falls_back_with_one_warning(monkeypatch, reload_native):
    monkeypatch.setattr(_dispatch, "built_torch_version", lambda: "2.0.0+cu118")
    x = torch.randn(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native_available() and not native_available(cuda=True)
        assert backend_for("rollout_step", x) == backend_for("qk_norm_rope", x) == "reference"   # CPU_AUTO's cpp
        assert backend_for("rollout_step", SimpleNamespace(is_cuda=True)) == "triton"   # CUDA_AUTO's cpp choice
        with use_backend("cpp"), pytest.raises(RuntimeError, match="built against torch 2.0.0"):
            backend_for("rollout_step", x)
    messages = [str(w.message) for w in caught]
    assert messages == [f"dopsd_fast._C was built against torch 2.0.0+cu118 but torch {torch.__version__} is running; "
                        "rebuild it with `pip install -e .`. The cpp backend is unavailable; ops use Triton / the "
                        "reference."]
