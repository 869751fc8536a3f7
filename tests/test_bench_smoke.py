"""Smoke test of the benchmark harness on the CPU, so it cannot rot: the cpu-tiny preset into a CSV,
the schema, the providers computing the same function, the summary's targets, the plots (only when
matplotlib is importable; it is not a dependency)."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import harness  # noqa: E402
import summary  # noqa: E402
from fused_posenc import bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "cpu.csv")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--preset", "cpu-tiny", "--seqlens", "64",
                        "--encodings", "none", "rope", "tapa", "--cpu-repeats", "2", "-q", "--out", out],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_csv_schema(tiny_csv):
    with open(tiny_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == bench.CSV_FIELDS
        rows = list(reader)
    assert rows
    assert {r["metric"] for r in rows} == {"time", "throughput", "peak_mem"}
    assert {r["kernel"] for r in rows} >= {"none", "rope", "tapa"}
    by_key = {}
    for r in rows:
        assert r["gpu"] == "cpu" and r["torch"] == torch.__version__
        assert r["mode"] in bench.MODES and int(r["x"]) == 64
        cfg = bench.parse_config(r["config"])
        assert cfg["seqlen"] == 64 and cfg["dtype"] == "fp32"
        if r["metric"] == "peak_mem":
            assert r["p50"] == "n/a"  # no fake memory numbers on a CPU
        else:
            vals = [float(r[k]) for k in ("p50", "p20", "p80")]
            assert all(v > 0 and math.isfinite(v) for v in vals)
            assert vals[1] <= vals[0] <= vals[2]
        by_key[(r["provider"], r["kernel"], r["mode"], r["metric"])] = r
    # throughput is the FlashAttention FLOP count over the median time
    for (p, k, m, metric), r in by_key.items():
        if metric == "time":
            shape = bench.Shape(**{key: bench.parse_config(r["config"])[key] for key in ("batch", "seqlen", "nheads",
                                   "headdim")}, causal=True, dtype="fp32", device="cpu")
            tput = float(by_key[(p, k, m, "throughput")]["p50"])
            assert tput == pytest.approx(bench.flops(shape, m) / float(r["p50"]) * 1e-9, rel=1e-3)
    assert os.path.exists(tiny_csv + ".skips.txt")


def test_flops_formula():
    s = bench.Shape(2, 1024, 16, 128, False, "bf16", "cpu")
    assert bench.flops(s, "fwd") == 4 * 2 * 16 * 1024 ** 2 * 128
    assert bench.flops(bench.Shape(2, 1024, 16, 128, True, "bf16", "cpu"), "fwd+bwd") == 3.5 * bench.flops(s, "fwd") / 2
    assert bench.flops(s, "bwd") == 2.5 * bench.flops(s, "fwd")


@pytest.mark.parametrize("name,encoding", [("rotate+sdpa-math", "rope"), ("rotate+sdpa-flash", "hope"),
                                           ("fope-authors", "fope"), ("sdpa-math", "alibi"), ("reference", "tapa")])
def test_providers_compute_the_same_function(name, encoding):
    import providers

    prov = providers.all_providers()[name]
    shape = bench.Shape(1, 48, 2, 32, True, "fp32", "cpu")
    errs = bench.check_provider(prov, encoding, shape)
    assert bench.check_ok(errs, torch.float32), errs
    assert max(e for e, _ in errs.values()) < 1e-4, errs


def _synthetic_rows(ours_factor: float, gpu="NVIDIA H100 80GB HBM3"):
    """Rows for the target checks: ours = ours_factor x the FLOP time, baselines 1.5x slower."""
    rows = []
    env = {"gpu": gpu, "torch": "2.11", "triton": "3.6", "commit": "abc"}
    for n in (1024, 2048, 8192, 16384, 32768):
        shape = bench.tokens_shape(n, 16384, 128, True, "bf16", "cuda")
        for mode in ("fwd", "fwd+bwd"):
            base_t = bench.flops(shape, mode) / 500e9  # ms at 500 TFLOP/s

            def add(kernel, provider, t, mem=100.0):
                for metric, unit, v in (("time", "ms", t), ("throughput", "TFLOP/s", bench.flops(shape, mode) / t * 1e-9),
                                        ("peak_mem", "MiB", mem)):
                    rows.append({"kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
                                 "x": n, "p50": v, "p20": v, "p80": v, "config": shape.config(), **env})

            add("none", "ours-triton", base_t)
            add("none", "sdpa-flash", base_t * 1.2)
            for enc in ("rope", "hope"):
                add(enc, "ours-triton", base_t * ours_factor)
                add(enc, "rotate+sdpa-flash", base_t * 1.5)
            add("alibi", "ours-triton", base_t * ours_factor)
            add("alibi", "flex", base_t * 1.5)
            add("fope", "ours-triton", base_t * 1.1, 100)
            add("fope", "fope-authors", base_t * 4, 400)
            add("tapa", "ours-triton", base_t * 1.25)
    return [{k: str(v) for k, v in r.items()} for r in rows]


def test_summary_targets(tiny_csv, tmp_path):
    md = summary.summarize(harness.load_rows([tiny_csv]))
    assert "## CPU" in md and "Targets" in md and "not measured" in md
    good = summary.Targets(harness.Table(_synthetic_rows(1.02)), "NVIDIA H100 80GB HBM3")
    lines = "\n".join(good.lines())
    assert "FAIL" not in lines and "not measured" not in lines, lines
    bad = summary.Targets(harness.Table(_synthetic_rows(1.45)), "NVIDIA H100 80GB HBM3")
    assert bad.fused_vs_rotate("rope")[0] == "FAIL"  # 1.5 / 1.45 < 1.10 at <= 2k
    assert bad.overhead("rope")[0] == "FAIL" and bad.overhead("tapa")[0] == "PASS"
    # the CLI writes a file
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, bench.CSV_FIELDS)
        w.writeheader()
        w.writerows(_synthetic_rows(1.02))
    assert summary.main([str(path), "--out", str(tmp_path / "s.md")]) == 0
    assert "| PASS |" in (tmp_path / "s.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (optional)")
def test_plot(tiny_csv, tmp_path):
    import plot

    written = plot.plot(harness.load_rows([tiny_csv]) + _synthetic_rows(1.02), str(tmp_path))
    assert written and all(os.path.getsize(p) > 0 for p in written)


def test_package_bench_entry(tmp_path):
    out = tmp_path / "pkg.csv"
    rc = bench.main(["--preset", "cpu-tiny", "--seqlens", "64", "--encodings", "fope", "--modes", "fwd",
                     "--cpu-repeats", "1", "-q", "--out", str(out)])
    assert rc == 0
    rows = harness.load_rows([str(out)])
    assert {r["provider"] for r in rows} >= {"fope-authors", "reference"}


def test_window_bench_runs(tmp_path):
    """benchmarks/bench_window.py end to end at tiny sizes: its CSV has every provider and mode."""
    out = str(tmp_path / "w")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_window.py"), "--lengths", "64", "--window", "16",
                        "--repeats", "1", "--device", "cpu", "--out", out], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(out + ".csv")))
    assert {(row["provider"], row["mode"]) for row in rows} == {
        (p, m) for p in ("fused-window", "fused-causal", "rotate+sdpa-mask") for m in ("fwd", "fwd+bwd")}
    assert "## fwd+bwd" in open(out + ".md").read()
