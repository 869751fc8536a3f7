"""backend="cuda" (the CUDA kernels of the extension) against the float64 reference. GPU only."""
import pytest
import torch

from helpers import check_against_reference, make_qkv

pytestmark = pytest.mark.gpu

ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]


def _available():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from fused_posenc.backends import get_backend

        return get_backend("cuda").available()
    except Exception as e:  # never fail at import
        return False, str(e)


_OK, _WHY = _available()
skip = pytest.mark.skipif(not _OK, reason=f"backend='cuda' unavailable: {_WHY}")


def cuda_fn(q, k, v, encoding, **kw):
    from fused_posenc import fused_attention

    return fused_attention(q, k, v, encoding, backend="cuda", **kw)


@skip
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encodings_dtypes(encoding, causal, dtype):
    q, k, v = make_qkv(2, 97, 130, 4, 2, 64, dtype, device="cuda")
    check_against_reference(cuda_fn, q, k, v, encoding, causal)


@skip
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("lq,lk", [(1, 1), (63, 63), (1, 97), (97, 63), (300, 1000)])
@pytest.mark.parametrize("headdim", [32, 48, 80, 128])
def test_shapes(encoding, lq, lk, headdim):
    q, k, v = make_qkv(1, lq, lk, 4, 1, headdim, torch.bfloat16, device="cuda", seed=lq + headdim)
    check_against_reference(cuda_fn, q, k, v, encoding, True)


@skip
@pytest.mark.parametrize("hc", [4, 2, 1])
def test_fope_learnable(hc):
    from fused_posenc.encodings.fope import FoPE

    enc = FoPE(64, hc, train_len=256, learnable=True, seed=3).cuda()
    q, k, v = make_qkv(2, 65, 90, 4, 2, 64, torch.float32, device="cuda", seed=hc)
    check_against_reference(cuda_fn, q, k, v, enc, True, params_fn=lambda: [enc.cos_coef, enc.sin_coef])


@skip
def test_positions_empty_rows():
    q, k, v = make_qkv(2, 50, 70, 4, 2, 64, torch.float16, device="cuda")
    qp = torch.stack([torch.arange(50) * 2 - 30, torch.arange(50)]).cuda()
    kp = torch.stack([torch.arange(70), torch.arange(70) + 5]).cuda()
    for enc in ENCODINGS:
        check_against_reference(cuda_fn, q, k, v, enc, True, q_positions=qp, k_positions=kp)
