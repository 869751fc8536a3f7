"""Triton backend on awkward shapes: odd lengths, head dims, Lq != Lk, MQA, strides, headdim_v."""
import pytest
import torch

from helpers import make_qkv
from triton_cases import DEVICE, DTYPES, ON_GPU, check_triton, needs_triton

pytestmark = needs_triton

SHAPES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)
    (1, 1, 1, 1, 1, 32),
    (2, 1, 63, 2, 1, 32),  # decoding a single token against a cache
    (1, 63, 63, 3, 3, 48),
    (1, 97, 33, 2, 2, 80),  # more queries than keys: the first rows see no key when causal
    (2, 17, 97, 4, 1, 128),  # MQA
]
if ON_GPU:
    SHAPES += [(2, 1025, 1025, 4, 2, 64), (1, 1025, 513, 2, 2, 96), (1, 255, 1025, 2, 1, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("encoding", ["rope", "tapa", "alibi"])
def test_shapes(encoding, shape, causal, dtype):
    q, k, v = make_qkv(*shape, dtype, DEVICE, seed=sum(shape))
    check_triton(q, k, v, encoding, causal)


@pytest.mark.parametrize("encoding", ["none", "fope", "hope"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
def test_shapes_other_encodings(encoding, shape):
    q, k, v = make_qkv(*shape, torch.float16, DEVICE, seed=3 + sum(shape))
    check_triton(q, k, v, encoding, True)


@pytest.mark.parametrize("encoding", ["rope", "tapa", "fope"])
def test_non_contiguous_inputs_and_headdim_v(encoding):
    b, lq, lk, h, hkv, d, dv = 2, 21, 30, 4, 2, 32, 48
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, torch.float32, DEVICE, headdim_v=dv, seed=4, requires_grad=False)
    # (B, H, L, D) storage seen through a (B, L, H, D) view, as after a projection + transpose
    q = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k = k.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_()
    v = torch.cat([v, v], -1)[..., ::2].detach().requires_grad_()  # stride 2 in the last dim
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    q0, k0, v0 = q.detach().clone(), k.detach().clone(), v.detach().clone()
    check_triton(q, k, v, encoding, True)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0), "inputs were modified"


@pytest.mark.skipif(ON_GPU, reason="on a GPU, SHAPES already hold seqlen 1025")
@pytest.mark.parametrize("encoding", ["tapa"])
def test_long_odd_seqlen_interpreter(encoding):
    """One long odd length through the interpreter: 33 x 33 tiles of 16 (the last one a single row), causal block
    skipping (seqlen 1025, 65 x 65 tiles, took 4 minutes of CI; a GPU run holds 1025 in SHAPES)."""
    q, k, v = make_qkv(1, 513, 513, 1, 1, 32, torch.float32, DEVICE, seed=1025)
    check_triton(q, k, v, encoding, True)
