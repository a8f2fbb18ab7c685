"""Builds the native extension dopsd_fast._C with CMake (CMakeLists.txt); all metadata lives in pyproject.toml.

`pip install [-e] .` runs this through csrc/pep517_backend.py. DOPSD_SKIP_NATIVE=1 skips the native build (the
package then runs its Triton / reference ops); DOPSD_CUDA_ARCHS overrides CMAKE_CUDA_ARCHITECTURES ("80;90a").
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).parent / "csrc"))
from pep517_backend import target_torch_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _torch_dir() -> str:
    spec = importlib.util.find_spec("torch")   # isolated build requirement, or the env under --no-build-isolation
    found = spec.submodule_search_locations[0] if spec else target_torch_dir()
    if not found:
        raise RuntimeError("dopsd_fast: building the native ops needs torch installed first "
                           "(or set DOPSD_SKIP_NATIVE=1 to install without them)")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DDOPSD_TORCH_DIR={_torch_dir()}", f"-DDOPSD_OUTPUT={target}"]
        if os.environ.get("DOPSD_CUDA_ARCHS"):
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['DOPSD_CUDA_ARCHS']}")
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "dopsd_C", "--parallel", jobs], check=True)


native = [] if os.environ.get("DOPSD_SKIP_NATIVE") == "1" else [Extension("dopsd_fast._C", sources=[])]
setup(ext_modules=native, cmdclass={"build_ext": CMakeBuild})
