"""The native build is driven by CMakeLists.txt through scikit-build-core: it must configure on a CPU-only machine
and compile against the target environment's torch (csrc/find_torch.py). The wheel holds the package, its presets
and the world's weights; the Triton kernels ship as dopsd_fast._kernels and never shadow the installed `kernels`."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

from dopsd_fast.testing import module_from_file

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
    assert (ROOT / "dopsd_fast" / "_kernels").resolve() == ROOT / "kernels"     # the wheel's and editable's way in
    assert (ROOT / "dopsd_fast" / "configs").resolve() == ROOT / "configs"


def test_build_requires_torch_only_where_the_target_has_none(monkeypatch):
    """The dynamic-metadata entry adds the README's torch pin to the build requirements only when the environment
    being installed into has no torch (a fresh venv); otherwise CMake compiles against the torch already there."""
    find_torch = module_from_file(ROOT / "csrc" / "find_torch.py")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dynamic-metadata"][0]
    assert entry["provider"] == {"path": "csrc", "module": "find_torch"}
    settings = {k: v for k, v in entry.items() if k != "provider"}
    readme_pin = re.search(r"pip install -q (torch==\S+)", (ROOT / "README.md").read_text()).group(1)
    assert settings["pinned"] == readme_pin
    monkeypatch.delenv("DOPSD_SKIP_NATIVE", raising=False)
    assert find_torch.get_requires_for_dynamic_metadata(settings) == []       # this environment has torch
    monkeypatch.setattr(find_torch, "target_torch_dir", lambda: None)
    assert find_torch.get_requires_for_dynamic_metadata(settings) == [readme_pin]
    monkeypatch.setenv("DOPSD_SKIP_NATIVE", "1")
    assert find_torch.get_requires_for_dynamic_metadata(settings) == []


def test_cmake_finds_the_target_torch_through_build_isolation(tmp_path):
    """pip's build isolation: PYTHONNOUSERSITE and a PYTHONPATH whose sitecustomize drops site-packages. The script
    CMake runs still names the torch of the environment being installed into."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    hidden = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0                                               # the isolation works
    out = subprocess.run([sys.executable, str(ROOT / "csrc" / "find_torch.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(Path(torch.__file__).parent)


@pytest.mark.skipif(importlib.util.find_spec("scikit_build_core") is None, reason="needs scikit-build-core ([dev])")
def test_the_wheel_holds_the_package_presets_kernels_and_world(tmp_path):
    """The pure-Python part of the wheel (DOPSD_SKIP_NATIVE=1: no compile), built as pip builds it."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "DOPSD_SKIP_NATIVE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("dopsd_fast-*.whl"))).namelist())
    assert {n.split("/")[0] for n in names} == {"dopsd_fast", "dopsd_fast-0.1.0.dist-info"}   # no top-level kernels
    assert {f"dopsd_fast/_kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")} <= names
    assert {f"dopsd_fast/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assets = ROOT / "dopsd_fast" / "world" / "assets"
    assert {f"dopsd_fast/world/assets/{p.relative_to(assets)}" for p in assets.rglob("*") if p.is_file()} <= names
    assert "dopsd_fast/cli.py" in names and "dopsd_fast/ops/_dispatch.py" in names


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
