"""Where the Triton tests run and with which dtypes: a CUDA device when there is one (fp16, bf16,
fp32), else the CPU interpreter (fp16, fp32: the interpreter's bf16 ``tl.dot`` is wrong)."""
import os

import pytest
import torch

import fused_posenc as fp
from helpers import check_against_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and not ON_GPU
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON or not (ON_GPU or INTERPRETED),
                                  reason="needs triton and a CUDA device or TRITON_INTERPRET=1")


def triton_fn(q, k, v, encoding, **kw):
    return fp.fused_attention(q, k, v, encoding, backend="triton", **kw)


def check_triton(q, k, v, encoding, causal, **kw):
    params_fn = None
    if isinstance(encoding, fp.FoPE) and encoding.learnable:
        params_fn = lambda: [encoding.cos_coef, encoding.sin_coef]  # noqa: E731
    check_against_reference(triton_fn, q, k, v, encoding, causal, params_fn=params_fn, **kw)
