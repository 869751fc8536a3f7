"""Skip reasons that name the real cause. Imports are checked apart from devices, so a missing numpy (which
Triton's interpreter imports) is reported as a missing numpy, not as a missing GPU.

    triton_skip_reason()               None if the Triton kernels can run here (a CUDA device, or
                                       TRITON_INTERPRET=1 with numpy), else every cause that stops them
    triton_skip_reason(gpu_only=True)  the same for tests that need a real CUDA device
    skip_unless_triton(gpu_only=False) a pytest skipif mark carrying that reason

tests/test_environment.py tests these with modules made unimportable through ``sys.modules``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import pytest
import torch


def import_problem(module: str) -> Optional[str]:
    """None if ``import module`` works, else what went wrong (the exception, as raised)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install failing in any other way
        return f"{type(e).__name__}: {e}"
    return None


def installed(module: str) -> bool:
    """Whether the import system can find ``module`` at all (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import; a module without __spec__
        return False


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_skip_reason(gpu_only: bool = False) -> Optional[str]:
    """Why the Triton kernels cannot run in this process, or None if they can.

    They run on a CUDA device, or (``gpu_only=False``, no CUDA device) on Triton's CPU interpreter when
    ``TRITON_INTERPRET=1``, which needs numpy. Every cause that holds is named, joined by "; "."""
    causes = []
    on_gpu = torch.cuda.is_available()
    interpreted = not gpu_only and not on_gpu and interpreter_requested()
    numpy_missing = False
    if interpreted:
        why = import_problem("numpy")
        if why is not None:
            numpy_missing = True
            causes.append(f"numpy is not importable ({why}); Triton's interpreter (TRITON_INTERPRET=1) needs it")
    if not installed("triton"):
        causes.append("triton is not installed")
    elif not numpy_missing:  # without numpy, importing triton under the interpreter fails for that reason alone
        why = import_problem("triton")
        if why is not None:
            causes.append(f"triton is not importable ({why})")
    if not on_gpu:
        if gpu_only:
            causes.append("no CUDA device (this test needs a real GPU)")
        elif not interpreted:
            causes.append("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it when "
                          "there is no CUDA device)")
    return "; ".join(causes) or None


def skip_unless_triton(gpu_only: bool = False):
    """A ``pytest.mark.skipif`` whose reason is :func:`triton_skip_reason`'s, evaluated now."""
    why = triton_skip_reason(gpu_only)
    return pytest.mark.skipif(why is not None, reason=why or "")
