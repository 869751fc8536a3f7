"""The test run tells the truth: what the suite needs is installed (a missing one fails here, it is never
skipped away), and the skip helper (tests/skips.py) names the real cause. The helper's tests fake modules
through ``sys.modules`` (None: unimportable; a bare module: importable) and the device through
``torch.cuda.is_available``, so they do not depend on what this machine has."""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch

import skips


def test_numpy_is_installed():
    # tests/test_errors.py uses it, and Triton's interpreter (the CPU run of every Triton test) imports it:
    # without it ~200 Triton tests would skip. scripts/install.sh installs it.
    assert skips.import_problem("numpy") is None, (
        f"numpy is not importable ({skips.import_problem('numpy')}): the test suite needs it; "
        "bash scripts/install.sh installs it")


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true", reason="checked in CI only (CI=true)")
def test_ci_has_everything_install_sh_installs():
    # in CI nothing may be skipped for a missing install step: triton, the C++ extension, pytest-benchmark,
    # transformers (the Hugging Face integration's tests)
    problems = {m: skips.import_problem(m) for m in ("triton", "pytest_benchmark", "fused_posenc._C", "transformers")}
    problems = {m: why for m, why in problems.items() if why is not None}
    assert not problems, f"not importable in CI: {problems}"
    assert skips.triton_skip_reason() is None, skips.triton_skip_reason()


def _fake(monkeypatch, module):
    """Make ``module`` importable (an empty module with a spec), whatever this machine has."""
    mod = types.ModuleType(module)
    mod.__spec__ = importlib.machinery.ModuleSpec(module, None)
    monkeypatch.setitem(sys.modules, module, mod)


def _hide(monkeypatch, module):
    """Make ``module`` unimportable: ``import module`` raises ImportError, find_spec finds nothing."""
    monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def cpu_interpreter(monkeypatch):
    """No CUDA device, TRITON_INTERPRET=1, triton and numpy importable: the Triton kernels can run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _fake(monkeypatch, "triton")
    _fake(monkeypatch, "numpy")
    return monkeypatch


def test_helper_runs_when_everything_is_there(cpu_interpreter):
    assert skips.triton_skip_reason() is None
    mark = skips.skip_unless_triton()
    assert mark.args == (False,)


def test_helper_names_numpy_when_numpy_is_missing(cpu_interpreter):
    _hide(cpu_interpreter, "numpy")
    why = skips.triton_skip_reason()
    assert why is not None and "numpy" in why and "TRITON_INTERPRET=1" in why
    assert "CUDA" not in why and "triton is not" not in why  # numpy is the one cause
    mark = skips.skip_unless_triton()
    assert mark.args == (True,) and mark.kwargs["reason"] == why
    # as in a real environment without numpy: importing triton under the interpreter fails on numpy too;
    # that is the same cause, not a second one
    _import_fails(cpu_interpreter, "triton", ModuleNotFoundError("No module named 'numpy'"))
    assert skips.triton_skip_reason() == why


def test_helper_names_triton_when_triton_is_missing(cpu_interpreter):
    _hide(cpu_interpreter, "triton")
    why = skips.triton_skip_reason()
    assert why == "triton is not installed"


def _import_fails(monkeypatch, module, error):
    """``module`` is found on disk, but importing it raises ``error`` (seen by tests/skips.py only)."""
    real = importlib.import_module

    def import_module(name, *a, **kw):
        if name == module:
            raise error
        return real(name, *a, **kw)

    monkeypatch.setattr(skips, "importlib", types.SimpleNamespace(import_module=import_module, util=importlib.util))


def test_helper_names_a_broken_triton(cpu_interpreter):
    _import_fails(cpu_interpreter, "triton", ImportError("libtriton.so: cannot open shared object file"))
    why = skips.triton_skip_reason()
    assert why is not None and why.startswith("triton is not importable") and "libtriton.so" in why


def test_helper_names_the_device_when_there_is_none(cpu_interpreter):
    cpu_interpreter.delenv("TRITON_INTERPRET")
    why = skips.triton_skip_reason()
    assert why is not None and "no CUDA device" in why and "TRITON_INTERPRET" in why
    assert "numpy" not in why and "triton is not" not in why
    # without the interpreter numpy is not needed: its absence is not a cause
    _hide(cpu_interpreter, "numpy")
    assert skips.triton_skip_reason() == why


def test_helper_names_every_cause(cpu_interpreter):
    cpu_interpreter.delenv("TRITON_INTERPRET")
    _hide(cpu_interpreter, "triton")
    why = skips.triton_skip_reason()
    assert "triton is not installed" in why and "no CUDA device" in why


def test_gpu_only_needs_a_device_not_the_interpreter(cpu_interpreter):
    why = skips.triton_skip_reason(gpu_only=True)
    assert why is not None and "no CUDA device" in why and "numpy" not in why
    _hide(cpu_interpreter, "numpy")  # numpy is the interpreter's need, not the GPU's
    assert skips.triton_skip_reason(gpu_only=True) == why
    cpu_interpreter.setattr(torch.cuda, "is_available", lambda: True)
    assert skips.triton_skip_reason(gpu_only=True) is None


def test_the_suite_uses_the_helper():
    # tests/triton_cases.py's mark carries the helper's reason for this process (None: the tests run)
    import triton_cases

    why = skips.triton_skip_reason()
    assert triton_cases.needs_triton.args == (why is not None,)
    assert triton_cases.needs_triton.kwargs["reason"] == (why or "")
