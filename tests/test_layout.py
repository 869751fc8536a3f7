"""layout="bhsd" (SDPA's (batch, heads, seqlen, headdim)) equals "bshd" on transposed inputs, forward, lse and
gradients, on the reference and the cpu backend, with no copy of the inputs; the guard that names layout= when only
the other layout explains the shapes; dropout_p refused with NotImplementedError; an unknown layout refused."""
import pytest
import torch

from fused_posenc import fused_attention, reference_attention
from fused_posenc.backends import get_backend


def _backends():
    ok, why = get_backend("cpu").available()
    return ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not ok, reason=why))]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("encoding,causal", [("rope", True), ("alibi", False), ("tapa", True)])
def test_bhsd_equals_bshd(backend, encoding, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g, requires_grad=True)  # (B, H, Lq, D), GQA and Lq != Lk
    k = torch.randn(2, 2, 9, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 9, 16, generator=g, requires_grad=True)
    do = torch.randn(2, 4, 7, 16, generator=g)
    out, lse = fused_attention(q, k, v, encoding, causal=causal, backend=backend, layout="bhsd", return_lse=True)
    assert out.shape == (2, 4, 7, 16) and lse.shape == (2, 4, 7)
    grads = torch.autograd.grad((out * do).sum() + lse.sum(), [q, k, v])
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fused_attention(qt, kt, vt, encoding, causal=causal, backend=backend, return_lse=True)
    ref_grads = torch.autograd.grad((ref * do.transpose(1, 2)).sum() + ref_lse.sum(), [qt, kt, vt])
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_bhsd_reads_views_of_the_inputs():
    """The reference sees the caller's storage through a transposed view (nothing copied before the math)."""
    seen = {}
    import fused_posenc.reference as reference

    real = reference.attention_math

    def spy(q, k, v, *args, **kw):
        seen["q"] = q
        return real(q, k, v, *args, **kw)

    q = torch.randn(1, 2, 5, 8)
    reference.attention_math = spy
    try:
        out = reference_attention(q, q, q, "none", layout="bhsd")
    finally:
        reference.attention_math = real
    assert seen["q"].data_ptr() == q.data_ptr() and seen["q"].shape == (1, 5, 2, 8)
    assert out.shape == (1, 2, 5, 8)


def test_guard_names_layout_when_only_bhsd_explains_the_shapes():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 9, 16)  # bhsd with Lq != Lk: as bshd, heads 7 vs 9
    with pytest.raises(ValueError, match="layout='bhsd'"):
        fused_attention(q, k, k, "rope", backend="torch")
    fused_attention(q, k, k, "rope", backend="torch", layout="bhsd")  # and it runs in that layout
    with pytest.raises(ValueError) as e:  # an error neither layout explains has no hint
        fused_attention(torch.randn(2, 7, 4, 16), torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16), "rope")
    assert "layout" not in str(e.value)


def test_dropout_and_unknown_layout():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        fused_attention(q, q, q, "rope", dropout_p=0.1)
    with pytest.raises(TypeError, match="dropout_p must be a number"):
        fused_attention(q, q, q, "rope", dropout_p="0")
    with pytest.raises(ValueError, match="layout must be one of"):
        fused_attention(q, q, q, "rope", layout="sbhd")
    fused_attention(q, q, q, "rope", dropout_p=0.0, backend="torch")
