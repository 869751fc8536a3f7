"""Where the Triton tests run and with which dtypes: a CUDA device when there is one (fp16, bf16,
fp32), else the CPU interpreter (fp16, fp32: the interpreter's bf16 ``tl.dot`` is wrong)."""
import os

import torch

import fused_posenc as fp
from helpers import check_against_reference
from skips import import_problem, skip_unless_triton

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and not ON_GPU
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]

HAS_TRITON = import_problem("triton") is None

# the reason names the real cause: triton missing or broken, numpy missing under the interpreter, no device
needs_triton = skip_unless_triton()


def triton_fn(q, k, v, encoding, **kw):
    return fp.fused_attention(q, k, v, encoding, backend="triton", **kw)


def check_triton(q, k, v, encoding, causal, **kw):
    params_fn = None
    if isinstance(encoding, fp.FoPE) and encoding.learnable:
        params_fn = lambda: [encoding.cos_coef, encoding.sin_coef]  # noqa: E731
    check_against_reference(triton_fn, q, k, v, encoding, causal, params_fn=params_fn, **kw)
