"""CMakeLists.txt configures, builds the header-math unit test and passes it under ctest (torch-free part)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                                reason="cmake/ctest not found")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_cmake_builds_and_ctest_passes(tmp_path):
    build = str(tmp_path / "build")
    _run(["cmake", "-S", ROOT, "-B", build, "-DFUSED_POSENC_BUILD_TORCH_MODULE=OFF"])
    _run(["cmake", "--build", build, "-j", "2"])
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"])
    assert "100% tests passed" in out and "encoding_math" in out
