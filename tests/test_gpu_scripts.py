"""The GPU session scripts (scripts/gpu_first_call.sh, gpu_suite.sh, gpu_probe.py) and the first call's smoke.

On any machine: bash syntax; scripts/gpu_first_call.sh run with no CUDA device (fails fast, writes env.txt
and summary.txt, at most 8 files under $OUT, exits non-zero); its budget; its rerun mode's parsing of FAILED
lines; the probe's CSV header written before torch is even imported; a dry run of every probe section on the
CPU (Triton's interpreter, tiny shapes). On a GPU: test_first_call_smoke, the bf16 correctness smoke of every
encoding that gpu_first_call.sh runs first (``pytest tests/test_gpu_scripts.py -k smoke``).
"""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fused_posenc as fp
from helpers import check_against_reference, make_qkv
from skips import skip_unless_triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FIRST_CALL = SCRIPTS / "gpu_first_call.sh"
PROBE = SCRIPTS / "gpu_probe.py"
ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]


def _probe_module():
    spec = importlib.util.spec_from_file_location("gpu_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the smoke (GPU only) ----------------------------------------------------------------------------------
@pytest.mark.gpu
@skip_unless_triton(gpu_only=True)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_first_call_smoke(encoding):
    """bf16, forward and every gradient vs the float64 reference; GQA, lq != lk (bottom-right causal), ragged
    lengths (no multiple of a block), head dim 128 (the probe's)."""
    q, k, v = make_qkv(2, 97, 130, 4, 2, 128, torch.bfloat16, "cuda", seed=21)
    check_against_reference(lambda *a, **kw: fp.fused_attention(*a, backend="triton", **kw), q, k, v, encoding,
                            causal=True)


# --- the scripts (any machine) -----------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["gpu_first_call.sh", "gpu_suite.sh"])
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _first_call(out, *args, budget=120, timeout=120):
    env = dict(os.environ, OUT=str(out), FIRST_CALL_BUDGET=str(budget), CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable)
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(FIRST_CALL), *args], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=str(ROOT))
    return r, time.monotonic() - t0


def _files(out):
    return sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file())


def _summary(out):
    return (Path(out) / "summary.txt").read_text()


def test_first_call_without_gpu(tmp_path):
    out = tmp_path / "out"
    r, seconds = _first_call(out)
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    assert seconds < 60, f"took {seconds:.0f}s without a GPU\n{text}"
    files = _files(out)
    assert len(files) <= 8, files
    assert {"env.txt", "summary.txt", "probe.csv", "build.log"} <= set(files), files
    assert "cuda_available 0" in (out / "env.txt").read_text()
    summary = _summary(out)
    for line in ["build   skipped: no CUDA device", "smoke   rc=1", "probe   rc=2", "native  rc=1", "tests   rc=1",
                 "total   rc=1"]:
        assert line in summary, f"{line!r} not in\n{summary}"
    assert "no CUDA device" in (out / "smoke.log").read_text()
    assert "started in the background" not in summary  # the C++/CUDA build never starts without CUDA
    rows = list(csv.reader((out / "probe.csv").open()))
    assert rows[0] == _probe_module().COLUMNS
    assert rows[1][:2] == ["probe", "error"] and "no CUDA device" in rows[1][-1]
    assert len(rows) == 2


def test_first_call_budget_spent(tmp_path):
    out = tmp_path / "out"
    r, seconds = _first_call(out, budget=3)
    assert r.returncode != 0  # nothing ran
    assert seconds < 20
    summary = _summary(out)
    for step in ["env", "build", "smoke", "probe", "native", "tests"]:
        assert f"{step:7s} not started" in summary, summary
    assert len(_files(out)) <= 8


LOG_XDIST = """\
+ timeout 170 python3 -m pytest -v -p no:cacheprovider -rfEs -n 4 tests/test_gpu_scripts.py -k smoke
[gw0] [ 16%] PASSED tests/test_gpu_scripts.py::test_first_call_smoke[none]
[gw1] [ 33%] FAILED tests/test_gpu_scripts.py::test_first_call_smoke[tapa]
=========================== short test summary info ============================
FAILED tests/test_gpu_scripts.py::test_first_call_smoke[tapa] - AssertionError: dq: error 1e-1 > ...
==================== 1 failed, 5 passed in 80.12s (0:01:20) ====================
"""
LOG_PLAIN = """\
tests/test_triton_shapes.py::test_shapes[torch.bfloat16-1-1] PASSED       [  1%]
tests/test_triton_shapes.py::test_shapes[torch.bfloat16-97-63] FAILED     [  2%]
tests/test_native_cuda.py::test_shapes[rope-1-1-32] ERROR                  [  3%]
SKIPPED [1] tests/test_triton_long_gpu.py:12: no CUDA device
FAILED tests/test_triton_shapes.py::test_shapes[torch.bfloat16-97-63] - AssertionError
ERROR tests/test_native_cuda.py::test_shapes[rope-1-1-32] - RuntimeError
ERROR tests/test_triton_positions.py - ImportError: cannot import name
"""


def test_first_call_rerun_parses_failed_lines(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "smoke.log").write_text(LOG_XDIST)
    (logs / "tests.log").write_text(LOG_PLAIN)
    out = tmp_path / "out"
    r, _ = _first_call(out, "rerun", str(logs))
    assert r.returncode != 0  # no CUDA device to rerun them on
    listed = [line.strip() for line in (out / "rerun.log").read_text().splitlines() if line.startswith("  tests/")]
    assert listed == ["tests/test_gpu_scripts.py::test_first_call_smoke[tapa]",
                      "tests/test_triton_shapes.py::test_shapes[torch.bfloat16-97-63]",
                      "tests/test_native_cuda.py::test_shapes[rope-1-1-32]",
                      "tests/test_triton_positions.py"]
    assert "4 failed test(s)" in _summary(out) and "(1 native)" in _summary(out)
    assert "no CUDA device" in _summary(out)
    assert len(_files(out)) <= 8

    (logs / "smoke.log").write_text(LOG_XDIST.replace("FAILED", "PASSED"))
    (logs / "tests.log").write_text("tests/test_triton_shapes.py::test_shapes[x] PASSED [100%]\n")
    r, _ = _first_call(tmp_path / "out2", "rerun", str(logs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to rerun" in _summary(tmp_path / "out2")


def test_probe_header_before_torch(tmp_path):
    """A torch that cannot be imported: the header is on disk anyway, then one error row, exit status 2."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('planted: torch is broken')\n")
    csv_path = tmp_path / "probe.csv"
    env = dict(os.environ, PYTHONPATH=str(fake))
    r = subprocess.run([sys.executable, str(PROBE), "--csv", str(csv_path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == _probe_module().COLUMNS
    assert rows[1][:2] == ["probe", "error"] and "planted" in rows[1][-1]


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_probe_dry_run_on_cpu(tmp_path):
    """Every section of the probe runs (TRITON_INTERPRET=1, tiny float32 shapes) and writes its rows in order,
    none failed; the numbers mean nothing."""
    pytest.importorskip("numpy")
    csv_path = tmp_path / "probe.csv"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    args = ["--device", "cpu", "--dtype", "float32", "--encodings", "rope", "--seqlens", "16,16",
            "--batch", "1", "--heads", "2", "--headdim", "16", "--small-seqlen", "16", "--reps", "1",
            "--ab-kinds", "bwd,fwd", "--csv", str(csv_path)]
    r = subprocess.run([sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(csv_path.open()))
    assert not [row for row in rows if "FAILED" in row["note"]], r.stdout
    sections = [row["section"] for row in rows]
    order = ["probe", "sdpa", "first_call", "speed", "cpu_us", "syncs", "bwd_ab", "fwd_ab", "variants", "seqlens"]
    assert [s for s in order if s in sections] == order, sections
    group = {s: i for i, s in enumerate(order)}
    group["speed"] = group["first_call"]  # per encoding: its first call, then its timings
    assert sections == sorted(sections, key=group.get)  # written section by section, as measured
    ab = [row for row in rows if row["section"] == "bwd_ab"]
    assert [row["mode"] for row in ab] == ["bwd first-config", "bwd autotuned"]
    assert "max rel diff vs first-config" in ab[1]["note"]
    syncs = [row for row in rows if row["section"] == "syncs"]
    assert syncs and all(row["value"] == "0" for row in syncs)  # no CUDA here: nothing to sync with
    variants = {row["name"] for row in rows if row["section"] == "variants"}
    assert {"triton-rope-positions"} <= variants
