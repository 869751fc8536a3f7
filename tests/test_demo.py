"""The README's main job (python -m fused_posenc): checks pass on this machine's backends, the reference is
listed as the oracle (timed, not checked), a wrong backend makes it exit 1, and the report is one table a
user can read: the tolerance explained once, a speed-up column when timed, no line repeated."""

from fused_posenc import demo

# timing as short as it goes: tiny shape, one call per measurement
FAST_TIMING = ["--seqlen", "16", "--warmup", "0", "--min-runs", "1", "--min-time", "0"]


def _lines(out):
    return [line for line in out.splitlines() if line.strip()]


def _table(out):
    """The table's lines: from its header to the last row (before the footnotes)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("encoding "))
    end = start + 2
    while end < len(lines) and lines[end].strip() and not lines[end].startswith("["):
        end += 1
    return lines[start:end]


def _cells(table, row):
    hdr = table[0]
    dash = table[1]
    spans, i = [], 0
    for part in dash.split("  "):
        spans.append((i, i + len(part)))
        i += len(part) + 2
    names = [hdr[a:b].strip() for a, b in spans]
    return {n: row[a:b].strip() for n, (a, b) in zip(names, spans)}


def test_demo_checks_pass(capsys):
    assert demo.main(["--no-timing", "--encodings", "rope", "tapa", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert " FAIL" not in out and " ERROR" not in out
    assert "oracle" in out
    assert " 0 failed" in out


def test_demo_fails_on_a_wrong_backend(monkeypatch, capsys):
    real = demo.check

    def wrong(enc, backend, shape):
        ok, worst, err, ref_err, note = real(enc, backend, shape)
        return False, worst, err, ref_err, "forced failure"

    monkeypatch.setattr(demo, "check", wrong)
    assert demo.main(["--no-timing", "--encodings", "rope", "--dtypes", "fp32", "bf16", "--backends", "torch",
                      "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    # one failing note on two rows: printed once below the table, the rows point at it
    assert [line for line in out.splitlines() if "forced failure" in line] == ["[1] forced failure"]
    fails = [r for r in _table(out)[2:] if " FAIL" in r]
    assert len(fails) == 2 and all(_cells(_table(out), r)["notes"] == "1" for r in fails)


def test_tolerance_line_once_and_no_line_repeated(capsys):
    assert demo.main(["--no-timing", "--encodings", "rope", "alibi", "--dtypes", "fp32", "bf16"]) == 0
    out = capsys.readouterr().out
    tol = [line for line in out.splitlines() if "x ref + floor" in line]
    assert len(tol) == 1 and tol[0].startswith("check: pass if err <= 2 x ref + floor")
    assert "float64 reference" in tol[0] and "input dtype" in tol[0]
    lines = _lines(out)
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    table = _table(out)
    assert len(table) > 2 + 4  # header, rule, rows for 2 encodings x 2 dtypes x (torch + cpu at least)
    assert "speed-up" not in table[0]  # no timing, no timing columns


def test_speedup_column_when_timed(capsys):
    assert demo.main(["--encodings", "rope", "fope", "alibi", "none", "tapa", "--dtypes", "fp32", "--backends",
                      "torch", "cpu"] + FAST_TIMING) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert len([line for line in out.splitlines() if "x ref + floor" in line]) == 1
    table = _table(out)
    assert "speed-up fwd" in table[0] and "speed-up fwd+bwd" in table[0]
    rows = [_cells(table, r) for r in table[2:]]
    by = {(r["encoding"], r["backend"]): r for r in rows}
    # the baselines a user would otherwise run, checked and timed, one row per encoding
    for enc, base in (("rope", "rotate+sdpa"), ("fope", "rotate+sdpa"), ("alibi", "sdpa+bias"), ("none", "sdpa")):
        b = by[(enc, base)]
        assert b["check"] == "baseline" and b["ms fwd"] and b["ms fwd+bwd"] and b["err (tensor)"], b
        assert not b["speed-up fwd"]
        r = by[(enc, "cpu")]
        assert r["check"] == "pass" and r["speed-up fwd"].endswith("x") and r["speed-up fwd+bwd"].endswith("x")
        assert float(r["speed-up fwd"][:-1]) > 0
        assert by[(enc, "torch")]["speed-up fwd"].endswith("x")  # the oracle against the baseline too
    # TAPA: no SDPA baseline; against the reference (the oracle row), said once in a footnote
    assert not any(r["encoding"] == "tapa" and r["check"] == "baseline" for r in rows)
    tapa = by[("tapa", "cpu")]
    assert tapa["speed-up fwd"].endswith("x") and tapa["notes"]
    note = [line for line in out.splitlines() if "SDPA cannot express" in line]
    assert len(note) == 1 and "oracle" in note[0]
    assert note[0].split("]")[0].lstrip("[") in tapa["notes"].split(",")
    # a busy machine: noisy timings get a note, said once however many rows it flags
    assert len([line for line in out.splitlines() if line.startswith("[") and "noisy timing" in line]) <= 1
    assert "rotate+sdpa = fused_posenc.apply_rotary on q and k" in out
    assert "median of >= 1 calls" in out
    assert " 0 failed" in out


def test_timing_takes_medians_of_enough_runs(monkeypatch):
    """CPU timing runs until both the count and the time minimums are met, and reports the median."""
    from fused_posenc import bench

    calls = []
    clock = iter(range(0, 10 ** 6))

    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock) * 1e-3)  # each call: 1 ms
    p50 = bench.time_step(lambda: calls.append(1), "cpu", bench.TimingOptions(cpu_repeats=5, cpu_warmup=2,
                                                                             cpu_min_s=0.012))[0]
    assert len(calls) == 2 + 12 and abs(p50 - 1.0) < 1e-9
    calls.clear()
    bench.time_step(lambda: calls.append(1), "cpu", bench.TimingOptions(cpu_repeats=7, cpu_warmup=0, cpu_min_s=0))
    assert len(calls) == 7
    calls.clear()
    bench.time_step(lambda: calls.append(1), "cpu", bench.TimingOptions(cpu_repeats=100, cpu_warmup=0, cpu_min_s=1,
                                                                        cpu_max_s=0.005))
    assert len(calls) == 5  # bounded on a slow or busy machine


def test_table_speedups_and_shared_notes(capsys):
    """print_table on made-up rows: speed-up = baseline ms / row ms within a group, TAPA against the oracle,
    a note several rows share printed once."""
    R = demo.Result
    g32, g16, gt = ("rope", "fp32"), ("rope", "bf16"), ("tapa", "fp32")
    rows = [R("rope", "rotate+sdpa", "fp32", "baseline", "dv", 1e-6, 1e-6, 2e-5, 4.0, 12.0, group=g32, baseline=True),
            R("rope", "torch", "fp32", "oracle", ms_fwd=8.0, ms_fwdbwd=24.0, group=g32),
            R("rope", "cpu", "fp32", "pass", "dq", 1e-6, 1e-6, 2e-5, 1.0, 4.0, notes=["shared"], group=g32),
            R("rope", "rotate+sdpa", "bf16", "baseline", "dv", 1e-2, 1e-2, 4e-2, 3.0, 9.0, group=g16, baseline=True),
            R("rope", "cpu", "bf16", "pass", "dq", 1e-2, 1e-2, 4e-2, 1.5, 3.0, notes=["shared"], group=g16),
            R("tapa", "torch", "fp32", "oracle", ms_fwd=10.0, ms_fwdbwd=30.0, group=gt),
            R("tapa", "cpu", "fp32", "pass", "dk", 1e-5, 1e-5, 4e-5, 2.0, 5.0, group=gt)]
    demo.print_table(rows)
    out = capsys.readouterr().out
    table = _table(out)
    cells = [_cells(table, r) for r in table[2:]]
    assert [(c["speed-up fwd"], c["speed-up fwd+bwd"]) for c in cells] == [
        ("", ""), ("0.5x", "0.5x"), ("4x", "3x"), ("", ""), ("2x", "3x"), ("", ""), ("5x", "6x")]
    assert [c["notes"] for c in cells] == ["", "", "1", "", "1", "", "2"]
    assert out.count("shared") == 1 and "[1] shared" in out and out.count(demo.NO_SDPA_NOTE) == 1
    lines = _lines(out)
    assert len(lines) == len(set(lines))
