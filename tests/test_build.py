"""The native build is driven by CMakeLists.txt: it must configure on a CPU-only machine. The Triton kernels ship
as dopsd_fast._kernels and never shadow the installed `kernels` package."""
import os
import shutil
import subprocess
import sys
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
    pytest.importorskip("triton")
    import dopsd_fast._kernels as k
    import dopsd_fast._kernels.rollout_step as rollout_step

    assert [Path(p).resolve() for p in k.__path__] == [ROOT / "kernels"]
    assert Path(rollout_step.__file__).resolve() == ROOT / "kernels" / "rollout_step.py"
    # kernels/README.md: an __init__.py would make the folder shadow the installed `kernels` from the repo root
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "dopsd_fast" / "_kernels").resolve() == ROOT / "kernels"     # the editable install's way in


def _from_root(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``args`` run in the repository root, the way `python -m ...` / `python -c ...` put it first on sys.path."""
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_an_installed_kernels_package_wins_over_the_folder_from_the_repo_root(tmp_path):
    """Namespace-package precedence, whether or not the Hugging Face `kernels` is installed here: a regular
    `kernels` package later on the path is the one imported, not our folder that comes first."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    out = _from_root(sys.executable, "-c", "import kernels; print(kernels.CUDAProperties, kernels.__file__)",
                     env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", str(fake / "__init__.py")]


def test_without_a_kernels_package_the_folder_runs_nothing_as_kernels():
    """No `kernels` installed (-S: no site-packages): the name is an empty namespace, none of our code runs under
    it, and it has no distribution metadata, which is what transformers' and diffusers' availability checks read."""
    probe = ("import importlib.metadata as md, kernels\n"
             "try:\n    md.version('kernels'); print('metadata')\nexcept md.PackageNotFoundError:\n    pass\n"
             "print(kernels.__file__, sorted(k for k in vars(kernels) if not k.startswith('__')))")
    out = _from_root(sys.executable, "-S", "-c", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "[]"]


def test_transformers_hub_kernels_imports_from_the_repo_root():
    pytest.importorskip("transformers")
    out = _from_root(sys.executable, "-c", "import transformers.integrations.hub_kernels")
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("runner", ["python -m pytest", "pytest"])
def test_pytest_collects_from_the_repo_root(runner):
    """`python -m pytest` puts the root on sys.path; collecting the FLUX.2 export test imports transformers'
    hub-kernels integration, which imports the installed `kernels` (it failed with CUDAProperties missing)."""
    pytest.importorskip("diffusers")
    command = [sys.executable, "-m", "pytest"] if runner.startswith("python") else [
        str(Path(sys.executable).with_name("pytest"))]
    out = _from_root(*command, "--collect-only", "-q", "-p", "no:cacheprovider", "tests/models/test_export_flux2.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
