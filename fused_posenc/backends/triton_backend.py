"""The ``"triton"`` backend: the fused kernels in ``fused_posenc/ops/triton``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (a slow numpy simulation
used by the CPU test suite). bf16 is refused under the interpreter: its ``tl.dot`` on bf16 operands
is wrong there (seen with triton 3.9), and a silently wrong answer is worse than an error.
Positions must lie in ``[-2^30, 2^30)`` (the kernels use int32 arithmetic); caller-given positions are
checked without a host-device sync (an asynchronous device assert on CUDA, a ``ValueError`` on CPU tensors).
"""
from __future__ import annotations

import os

import torch

from ..encodings.angles import check_positions_range


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


POSITION_BOUND = 2**30


def check_positions_fit(p) -> None:
    """Caller-given positions must lie in ``[-2^30, 2^30)`` so that positions and their differences fit the
    kernels' int32 arithmetic; checked without a host-device sync (``check_positions_range``)."""
    if p.default_positions:
        return
    for name, pos in (("q_positions", p.q_pos), ("k_positions", p.k_pos)):
        check_positions_range(f"{name} (backend='triton')", pos, -POSITION_BOUND, POSITION_BOUND)


class TritonBackend:
    name = "triton"

    def available(self):
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return False, f"triton is not importable ({e})"
        if not torch.cuda.is_available() and not _interpreter():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
        return True, ""

    def supports(self, p):
        q = p.q
        if not q.is_cuda and not _interpreter():
            return False, f"triton needs CUDA tensors, got {q.device}"
        if q.is_cuda and _interpreter():
            return False, "TRITON_INTERPRET=1 runs CPU tensors only"
        if q.dtype == torch.float64:
            return False, "float64 is not supported by the Triton kernels (use backend='torch' or 'cpu')"
        if q.dtype == torch.bfloat16 and _interpreter():
            return False, "bfloat16 is not supported under TRITON_INTERPRET=1 (the interpreter's bf16 tl.dot is wrong)"
        d, dv = q.shape[-1], p.v.shape[-1]
        if d > 256 or dv > 256:
            return False, f"head dims up to 256 are supported, got headdim={d}, headdim_v={dv}"
        return True, ""

    def run(self, p):
        from ..ops.triton.autograd import triton_attention

        check_positions_fit(p)
        return triton_attention(p, num_splits=p.num_splits)
