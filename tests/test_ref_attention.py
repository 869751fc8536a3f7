"""reference_attention conventions: positions, causal rule, empty rows, GQA, inputs untouched, dispatch."""
import math

import pytest
import torch

from fused_posenc import (ALiBi, FoPE, HoPE, RoPE, TAPA, apply_rotary, fused_attention, get_encoding,
                          reference_attention)
from helpers import make_qkv

ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]


def _x(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def plain_attention(q, k, v, scores_bias=None, mask=None, scale=None):
    """(B, L, H, D) float64 softmax attention with an optional additive bias/mask (B|1, H|1, Lq, Lk)."""
    s = (1 / math.sqrt(q.shape[-1])) if scale is None else scale
    sc = torch.einsum("bmhd,bnhd->bhmn", q, k) * s
    if scores_bias is not None:
        sc = sc + scores_bias
    if mask is not None:
        sc = sc.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhmn,bnhd->bmhd", sc.softmax(-1), v)


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("lq,lk", [(3, 7), (7, 7), (1, 5)])
def test_default_positions_are_bottom_right_aligned(enc, lq, lk):
    q, k, v = _x(2, lq, 2, 8, seed=1), _x(2, lk, 2, 8, seed=2), _x(2, lk, 2, 8, seed=3)
    for causal in (False, True):
        got = reference_attention(q, k, v, enc, causal=causal)
        want = reference_attention(q, k, v, enc, causal=causal, q_positions=torch.arange(lk - lq, lk),
                                   k_positions=torch.arange(lk))
        assert torch.equal(got, want)


def test_default_causal_mask_is_bottom_right():
    lq, lk = 2, 5
    q, k, v = _x(1, lq, 1, 4, seed=1), _x(1, lk, 1, 4, seed=2), _x(1, lk, 1, 4, seed=3)
    got = reference_attention(q, k, v, "none", causal=True)
    mask = torch.tensor([[True, True, True, True, False], [True] * 5])
    torch.testing.assert_close(got, plain_attention(q, k, v, mask=mask), rtol=1e-12, atol=1e-12)


def test_explicit_positions_1d_and_batched():
    q, k, v = _x(2, 3, 2, 8, seed=1), _x(2, 4, 2, 8, seed=2), _x(2, 4, 2, 8, seed=3)
    qp1, kp1 = torch.tensor([5, 0, 9]), torch.tensor([3, 9, 1, 0])
    a = reference_attention(q, k, v, "rope", causal=True, q_positions=qp1, k_positions=kp1)
    b = reference_attention(q, k, v, "rope", causal=True, q_positions=qp1[None].expand(2, -1),
                            k_positions=kp1[None].expand(2, -1))
    assert torch.equal(a, b)
    # (B, L): each batch row uses its own positions
    qp = torch.stack([qp1, qp1 + 4])
    kp = torch.stack([kp1, torch.tensor([0, 1, 2, 3])])
    got = reference_attention(q, k, v, "rope", causal=True, q_positions=qp, k_positions=kp)
    for bi in range(2):
        one = reference_attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], "rope", causal=True,
                                  q_positions=qp[bi], k_positions=kp[bi])
        torch.testing.assert_close(got[bi:bi + 1], one, rtol=0, atol=0)
    # int32 positions are accepted
    c = reference_attention(q, k, v, "rope", causal=True, q_positions=qp.int(), k_positions=kp.int())
    assert torch.equal(c, got)


def test_causal_rule_uses_positions():
    q, k, v = _x(1, 4, 2, 8, seed=1), _x(1, 5, 2, 8, seed=2), _x(1, 5, 2, 8, seed=3)
    qp = torch.tensor([3, 0, 10, 2])
    kp = torch.tensor([2, 3, 0, 4, 2])
    got = reference_attention(q, k, v, "none", causal=True, q_positions=qp, k_positions=kp)
    mask = kp[None, :] <= qp[:, None]  # pos_k <= pos_q (equal positions visible)
    torch.testing.assert_close(got, plain_attention(q, k, v, mask=mask), rtol=1e-12, atol=1e-12)
    # non-causal ignores the positions for "none"
    nc = reference_attention(q, k, v, "none", q_positions=qp, k_positions=kp)
    torch.testing.assert_close(nc, plain_attention(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_without_keys_is_zero_with_zero_gradients(enc, dtype):
    q, k, v = (t.detach().requires_grad_() for t in (_x(2, 3, 2, 8, seed=1, dtype=dtype),
                                                      _x(2, 4, 1, 8, seed=2, dtype=dtype),
                                                      _x(2, 4, 1, 8, seed=3, dtype=dtype)))
    qp = torch.tensor([[0, 5, 9], [9, 1, 0]])  # query at position 0 (batch 0) and 0 (batch 1) see no key
    kp = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    out = reference_attention(q, k, v, enc, causal=True, q_positions=qp, k_positions=kp)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
    assert out[0, 1].abs().sum() > 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 0], torch.zeros_like(q.grad[0, 0]))
    assert torch.equal(q.grad[1, 2], torch.zeros_like(q.grad[1, 2]))


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv_heads(enc, causal):
    H, Hkv = 6, 2
    q, k, v = _x(2, 3, H, 8, seed=1), _x(2, 5, Hkv, 8, seed=2), _x(2, 5, Hkv, 4, seed=3)
    if enc == "fope":
        enc = FoPE(8, num_heads=H, train_len=64, seed=1)  # per query head coefficients
    got = reference_attention(q, k, v, enc, causal=causal)
    want = reference_attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), enc, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # query heads 3..5 read kv head 1 (for encodings that do not depend on the head index)
    if enc in ("none", "rope", "hope", "tapa"):
        sel = reference_attention(q[:, :, 3:6], k[:, :, 1:2], v[:, :, 1:2], enc, causal=causal)
        torch.testing.assert_close(got[:, :, 3:6], sel, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_inputs_never_modified(enc):
    base = _x(2, 6, 4, 16, seed=1, dtype=torch.float32)
    q = base.transpose(1, 2)  # (2, 4, 6, 16) seen as (B, L=4, H=6, D) non-contiguous
    k = _x(2, 16, 5, 3, seed=2, dtype=torch.float32).permute(0, 2, 3, 1)[..., :16]  # (2, 5, 3, 16) strided
    v = _x(2, 5, 3, 16, seed=3, dtype=torch.float32)[..., ::2]  # (2, 5, 3, 8) strided
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    clones = [t.clone() for t in (q, k, v)]
    qp, kp = torch.tensor([1, 2, 3, 4]), torch.arange(5)
    pclones = (qp.clone(), kp.clone())
    out = reference_attention(q, k, v, enc, causal=True, q_positions=qp, k_positions=kp)
    out2 = fused_attention(q, k, v, enc, causal=True, q_positions=qp, k_positions=kp, backend="torch")
    for t, c in zip((q, k, v), clones):
        assert torch.equal(t, c)
    assert torch.equal(qp, pclones[0]) and torch.equal(kp, pclones[1])
    # non-contiguous inputs give the contiguous answer
    ref = reference_attention(*(t.contiguous() for t in (q, k, v)), enc, causal=True, q_positions=qp, k_positions=kp)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)
    if enc in ("rope", "hope", "fope"):
        x = q.clone()
        apply_rotary(q, enc)
        assert torch.equal(q, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_output_dtype_and_shape(dtype, enc):
    q, k, v = make_qkv(2, 3, 5, 4, 2, 8, dtype, headdim_v=6, requires_grad=False)
    out = reference_attention(q, k, v, enc, causal=True)
    assert out.dtype == dtype and out.shape == (2, 3, 4, 6)
    assert torch.isfinite(out).all()
    ref = reference_attention(q.double(), k.double(), v.double(), enc, causal=True)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_equals_reference(enc, causal):
    q, k, v = make_qkv(2, 4, 6, 4, 2, 8, torch.float32, requires_grad=False)
    a = fused_attention(q, k, v, enc, causal=causal, backend="torch", softmax_scale=0.3)
    b = reference_attention(q, k, v, enc, causal=causal, softmax_scale=0.3)
    assert torch.equal(a, b)


def test_rotation_encodings_equal_rotate_then_attend():
    q, k, v = _x(1, 4, 2, 16, seed=1), _x(1, 6, 2, 16, seed=2), _x(1, 6, 2, 16, seed=3)
    qp, kp = torch.tensor([5, 6, 7, 8]), torch.tensor([0, 2, 4, 6, 8, 10])
    for enc in (RoPE(), RoPE(interleaved=True, rotary_dim=8), HoPE(train_len=64), FoPE(16, num_heads=2, train_len=500, seed=3)):
        got = reference_attention(q, k, v, enc, causal=True, q_positions=qp, k_positions=kp)
        mask = kp[None, :] <= qp[:, None]
        want = plain_attention(apply_rotary(q, enc, qp), apply_rotary(k, enc, kp), v, mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_apply_rotary_defaults_and_dtype():
    x = _x(2, 5, 3, 8, seed=1, dtype=torch.float16)
    out = apply_rotary(x)  # rope, positions arange(seqlen)
    assert out.dtype == torch.float16 and out.shape == x.shape
    ref = apply_rotary(x.double(), "rope", torch.arange(5))
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is the identity
    # batched positions
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 8, 7, 6, 5]])
    o2 = apply_rotary(x.double(), "rope", pos)
    torch.testing.assert_close(o2[1:], apply_rotary(x[1:].double(), "rope", pos[1]), rtol=0, atol=0)
    for name in ("hope", "fope"):
        assert apply_rotary(x.float(), name).shape == x.shape


@pytest.mark.parametrize("enc", ["alibi", "tapa", "none", ALiBi(), TAPA()])
def test_apply_rotary_rejects_score_encodings(enc):
    x = _x(1, 3, 2, 8, seed=1)
    with pytest.raises(ValueError, match="rotation encoding"):
        apply_rotary(x, enc)


def test_encoding_instance_passthrough():
    enc = RoPE(base=500.0)
    assert get_encoding(enc) is enc
    q, k, v = _x(1, 3, 2, 8, seed=1), _x(1, 3, 2, 8, seed=2), _x(1, 3, 2, 8, seed=3)
    assert not torch.allclose(reference_attention(q, k, v, enc), reference_attention(q, k, v, "rope"))
    torch.testing.assert_close(reference_attention(q, k, v, "ROPE"), reference_attention(q, k, v, "rope"))
    torch.testing.assert_close(reference_attention(q, k, v, "nope"), reference_attention(q, k, v, "none"))
