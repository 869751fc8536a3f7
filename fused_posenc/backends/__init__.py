"""Backend registry: one autograd layer per backend, one selection rule.

Each backend is an object with ``name``, ``available() -> (bool, reason)``,
``supports(problem) -> (bool, reason)`` and ``run(problem) -> out``. ``"auto"`` picks, in order,
the fastest backend that is available and supports the call: Triton for CUDA tensors, the CUDA
extension for CUDA tensors when Triton cannot run, the C++ extension for CPU tensors, and the
PyTorch reference last. Falling back to a slower backend than the device's first choice emits a
one-time warning that says why. ``FUSED_POSENC_BACKEND`` replaces ``"auto"`` with a fixed name.
"""
from __future__ import annotations

import os
import warnings

from .torch_backend import TorchBackend

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch")
_REGISTRY: dict = {}
_WARNED: set = set()


def register(backend) -> None:
    _REGISTRY[backend.name] = backend


def get_backend(name: str):
    if name not in _REGISTRY:
        _load(name)
    return _REGISTRY[name]


def _load(name: str) -> None:
    if name == "triton":
        from .triton_backend import TritonBackend
        register(TritonBackend())
    elif name in ("cuda", "cpu"):
        from .native_backend import NativeBackend
        register(NativeBackend(name))
    elif name == "torch":
        register(TorchBackend())


def _auto_order(problem):
    if problem.q.is_cuda:
        return ["triton", "cuda", "torch"]
    return ["cpu", "torch"]


def select_backend(name: str, problem):
    """Return the backend object that will run ``problem``; raise ``ValueError`` if it cannot."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    if name == "auto":
        env = os.environ.get("FUSED_POSENC_BACKEND", "").strip()
        if env:
            if env not in BACKEND_NAMES:
                raise ValueError(f"FUSED_POSENC_BACKEND must be one of {list(BACKEND_NAMES)}, got {env!r}")
            name = env
    if name != "auto":
        b = get_backend(name)
        ok, why = b.available()
        if not ok:
            raise ValueError(f"backend={name!r} is not available: {why}")
        ok, why = b.supports(problem)
        if not ok:
            raise ValueError(f"backend={name!r} does not support this call: {why}")
        return b
    reasons = []
    for cand in _auto_order(problem):
        b = get_backend(cand)
        ok, why = b.available()
        if ok:
            ok, why = b.supports(problem)
        if ok:
            if reasons:
                key = (cand, tuple(reasons))
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(f"fused_posenc: backend='auto' uses {cand!r} because " + "; ".join(reasons),
                                  RuntimeWarning, stacklevel=3)
            return b
        reasons.append(f"{cand!r} unusable ({why})")
    raise ValueError("no backend can run this call: " + "; ".join(reasons))
