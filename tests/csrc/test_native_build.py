"""The native build without a GPU: configuring against a CPU-only torch says it skips CUDA, and every csrc/cuda/*.cu
compiles with nvcc for sm_90a through CMake's dopsd_cuda_check target, which needs no torch (the .cu files include
only csrc/include/), so a syntax or type error in CUDA code fails CI."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cuda_sources_compile_for_sm90(tmp_path):
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "csrc/cuda has no .cu files"
    env = {**os.environ, "CUDACXX": NVCC}
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DDOPSD_CUDA_CHECK=ON",
                                "-DCMAKE_CUDA_ARCHITECTURES=90a"], capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path), "--target", "dopsd_cuda_check", "--parallel", "2"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    objects = {p.name for p in tmp_path.rglob("*.o")}
    assert {f"{s.name}.o" for s in sources} <= objects, objects


@pytest.mark.skipif(shutil.which("cmake") is None or torch.version.cuda is not None, reason="needs cmake, CPU torch")
def test_cpu_torch_configure_skips_cuda(tmp_path):
    torch_dir = f"-DDOPSD_TORCH_DIR={Path(torch.__file__).parent}"
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), torch_dir], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is a CPU build, CUDA ops skipped" in result.stdout
