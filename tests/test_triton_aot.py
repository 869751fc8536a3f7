"""Every Triton kernel variant compiles for a real NVIDIA target (sm_90) through Triton's own pipeline
down to a cubin, without a GPU, and its preferred config fits the shared memory: the check the CPU
interpreter cannot make (it never lowers a kernel). bf16 at head dim 128 here (the dtype the
interpreter cannot run); ``python scripts/triton_aot.py`` covers every dtype, head dim and config."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")


def test_every_variant_compiles_for_sm90_bf16():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "triton_aot.py"), "--quick", "--arch", "90",
           "--dims", "128", "--dtypes", "bf16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    tail = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "Warning" not in line)[-6000:]
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    assert " 0 problem(s)" in r.stdout and "compiles of" in r.stdout, tail


def test_sass_histogram_columns_for_one_variant(tmp_path):
    """``--sass`` compiles with the JIT's specialisation (divisible-by-16 arguments, ints equal to 1 as
    constants) and fills the ptxas and main-loop SASS columns of the CSV and the Markdown report."""
    import csv

    tools = [os.path.join(p, "shared", "tools", "sass_loop.py") for p in (ROOT, os.path.dirname(ROOT))]
    if not any(os.path.isfile(t) for t in tools):
        pytest.skip("shared/tools/sass_loop.py not present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_csv, out_md = tmp_path / "s.csv", tmp_path / "s.md"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "triton_aot.py"), "--quick", "--arch", "90", "--dims", "64",
           "--dtypes", "bf16", "--sass", "--match", "fwd:none:", "--jobs", "1", "--csv", str(out_csv),
           "--md", str(out_md)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = list(csv.DictReader(open(out_csv)))
    assert [row["variant"] for row in rows] == ["fwd:none:bf16:d64"]
    row = rows[0]
    assert row["specialised"] == "jit" and int(row["div16_args"]) > 0 and int(row["const1_args"]) > 0, row
    for col in ("registers", "spill_bytes", "shared_bytes", "loop_instrs", "hgmma", "mufu", "ldl", "stl", "bar"):
        assert row[col].isdigit(), (col, row)
    assert int(row["loop_instrs"]) > 0 and int(row["hgmma"]) > 0 and int(row["mufu"]) > 0, row
    # causal: an interior loop without masks and a boundary loop with them, the interior the shorter
    interior, boundary = (int(n) for n in row["tc_loops"].split("/"))
    assert int(row["interior_instrs"]) == interior < boundary == int(row["loop_instrs"]), row
    assert "| fwd:none:bf16:d64 |" in out_md.read_text()
