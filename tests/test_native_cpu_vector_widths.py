"""backend="cpu" with its narrower vector code paths (AVX2: 32 bytes, SSE: 16 bytes) on this machine.

The CPU kernels pick their explicit vector width by CPU features when the extension loads; a machine with
AVX-512 never runs the 32- and 16-byte tiles and row reductions. ``FUSED_POSENC_CPU_VECTOR_BYTES`` narrows
the width (read at load, hence a fresh interpreter per width), and the whole CPU test file runs again.
"""
import os
import subprocess
import sys

import pytest

from fused_posenc.backends import get_backend

_ok, _why = get_backend("cpu").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")

TESTS = os.path.dirname(os.path.abspath(__file__))


def _widest():
    from fused_posenc import _C
    return _C.cpu_vector_bytes() if "FUSED_POSENC_CPU_VECTOR_BYTES" not in os.environ else None


def _run(args, vector_bytes):
    env = dict(os.environ, FUSED_POSENC_CPU_VECTOR_BYTES=str(vector_bytes))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(TESTS), check=False)


@pytest.mark.parametrize("vector_bytes", [16, 32])
def test_cpu_backend_at_narrower_vector_width(vector_bytes):
    widest = _widest()
    if widest is None:
        pytest.skip("FUSED_POSENC_CPU_VECTOR_BYTES is already set for this run")
    if widest <= vector_bytes:
        pytest.skip(f"this CPU's widest path is {widest} bytes: the main CPU tests already run it")
    r = _run(["-c", "from fused_posenc import _C; print(_C.cpu_vector_bytes())"], vector_bytes)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(vector_bytes), f"width override not applied: {r.stdout!r} {r.stderr!r}"
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(TESTS, "test_native_cpu.py")],
             vector_bytes)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
