"""The ``"cpu"`` and ``"cuda"`` backends: the C++/CUDA extension ``fused_posenc._C``.

``"cpu"``: CPU tensors of any supported dtype (float64 computes in float64, the others in float32).
``"cuda"``: CUDA tensors in float16, bfloat16 or float32, only when the extension was built with CUDA.
"""
from __future__ import annotations

import torch

from .common import batch_specific_encoding, learnable_slopes, run_by_rows


def _extension():
    try:
        from .. import _C  # noqa: F401
        return _C, ""
    except ImportError as e:  # not built
        return None, f"the C++/CUDA extension fused_posenc._C is not built ({e})"


class NativeBackend:
    def __init__(self, name: str):
        self.name = name

    def available(self):
        ext, why = _extension()
        if ext is None:
            return False, why
        if self.name == "cuda" and not getattr(ext, "has_cuda", lambda: False)():
            return False, "the extension was built without CUDA"
        return True, ""

    def supports(self, problem):
        want_cuda = self.name == "cuda"
        if problem.q.is_cuda != want_cuda:
            return False, f"backend {self.name!r} needs {'CUDA' if want_cuda else 'CPU'} tensors, got {problem.q.device}"
        if want_cuda and learnable_slopes(problem):
            return False, "ALiBi slopes that require grad: the CUDA kernels have no slope gradient (backend='cpu' or 'torch')"
        if problem.k_lengths is not None:
            if want_cuda:
                return False, "key lengths (varlen, KV cache): the CUDA kernels take none (use backend='triton')"
            if batch_specific_encoding(problem):
                return False, ("key lengths with per-batch ALiBi slopes: backend='cpu' runs the rows one by one and "
                               "cannot split the slopes (use backend='torch')")
        if want_cuda and (problem.window is not None or problem.softcap is not None):
            return False, ("window_size and softcap: the CUDA fallback kernels take neither (use backend='triton', "
                           "'cpu' on CPU tensors, or 'torch')")
        if want_cuda and problem.q.dtype == torch.float64:
            return False, "the CUDA kernels take float16, bfloat16 or float32 (use backend='torch' for float64)"
        return True, ""

    def run(self, p):
        from ..ops.native import native_attention

        if p.k_lengths is not None:  # CPU tensors (supports): the lengths are read without a device sync
            return run_by_rows(p, lambda row: native_attention(row, self.name))
        return native_attention(p, self.name)
