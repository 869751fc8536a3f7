"""Every csrc/cuda/*.cu compiles with nvcc (sm_80 and sm_90, C++17) on any machine with nvcc, GPU or not."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = os.path.join(home, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    return nvcc


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu is empty"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("src", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_nvcc_compiles(src, arch, tmp_path):
    cmd = [_nvcc(), "-c", "-std=c++17", "-O2", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc"), src,
           "-o", str(tmp_path / (os.path.basename(src) + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}"
