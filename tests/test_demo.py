"""The README's main job (python -m fused_posenc): checks pass on this machine's backends, the reference is
listed as the oracle (timed, not checked), and a wrong backend makes it exit 1."""

from fused_posenc import demo


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
    assert demo.main(["--no-timing", "--encodings", "rope", "--dtypes", "fp32"]) == 1
    assert "FAIL" in capsys.readouterr().out
