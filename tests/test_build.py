"""The native build is driven by CMakeLists.txt: it must configure on a CPU-only machine."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures(tmp_path):
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dopsd_fast:" in result.stdout


def test_kernels_ship_inside_the_package_not_as_top_level_kernels():
    import importlib.util

    import dopsd_fast._kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    spec = importlib.util.find_spec("kernels")
    # `kernels` is the Hugging Face kernel hub package that diffusers imports; ours must never shadow it.
    assert spec is None or Path(spec.origin or "").resolve().parent != ROOT / "kernels"
