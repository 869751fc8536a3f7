"""examples/train_tiny_lm.py: a short run's copy loss falls and the loss curve is written."""
import csv
import importlib.util
import os

import pytest

from fused_posenc.backends import get_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ok, _why = get_backend("cpu").available()


@pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")
def test_train_tiny_lm_loss_falls(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_tiny_lm", os.path.join(ROOT, "examples", "train_tiny_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "curve.csv"
    assert mod.main(["--encoding", "rope", "--steps", "36", "--batch", "16", "--half-len", "8", "--vocab", "16",
                     "--d-model", "32", "--device", "cpu", "--backend", "cpu", "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and list(rows[0]) == ["step", "loss", "seconds"]
    losses = [float(r["loss"]) for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"copy loss {first:.3f} -> {last:.3f}"
    assert "copy loss" in capsys.readouterr().out
