"""scripts/fuzz_native.py (the seeded fuzz that scripts/sanitize.sh runs under ASan + UBSan) on the normal build, so
the fuzz script itself cannot rot: a few random cases against the reference, and the bad inputs to the bindings."""
import os
import subprocess
import sys

import pytest

from fused_posenc.backends import get_backend

_ok, _why = get_backend("cpu").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "scripts", "fuzz_native.py")


def _fuzz(*args):
    r = subprocess.run([sys.executable, FUZZ, *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       check=False)
    out = r.stdout + r.stderr
    summary = [line for line in out.splitlines() if line.startswith("fuzz_native: ") and "cases" in line]
    assert r.returncode == 0, out[-4000:]
    assert summary, out[-4000:]
    return summary[-1]


def test_fuzz_random_cases():
    summary = _fuzz("--iters", "5", "--seed", "0")
    assert summary.startswith("fuzz_native: 5 random cases") and " 0 failures" in summary, summary


def test_fuzz_bad_bindings():
    summary = _fuzz("--no-random", "--bad-bindings", "--seed", "0")
    assert " 0 random cases" in summary and " 0 failures" in summary, summary
    assert int(summary.split(" bad-binding cases")[0].rsplit(" ", 1)[1]) > 10, summary


# cases the fuzz once failed (case i of seed s depends only on (s, i)): ALiBi with every visible key ~2^62 away
# (the cpu backward read an lse rounded at that size), TAPA float32 with keys not consecutive in a tile (Omega by a
# ~2-ulp pow instead of the per-call table), rows that see a single key (dS = 0 exactly: the delta summation order),
# and float64 TAPA at distance 10^6 (psi ~ 1e7 rad: the phase floor)
@pytest.mark.parametrize("seed,index", [(2, 1000020), (0, 234), (1, 263), (1, 276), (6, 395), (9, 1000050),
                                        (24, 1000029), (18, 277), (22, 348), (23, 1000026), (30, 57)])
def test_fuzz_former_failures(seed, index):
    summary = _fuzz("--seed", str(seed), "--only", str(index))
    assert "1 random cases" in summary and " 0 failures" in summary, summary
