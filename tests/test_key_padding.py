"""Public key padding (``k_lengths``, ``padding_side``): the reference against per-row slicing, every backend
against the reference, rows that see no key, and bad lengths."""
import pytest
import torch

import fused_posenc as fp
from helpers import check_against_reference, encoding_factories, make_qkv
from triton_cases import DEVICE, check_triton, needs_triton

ENCODINGS = encoding_factories(head_dim=16, nheads=2)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["rope", "alibi", "tapa"])
def test_reference_keeps_each_rows_first_or_last_keys(name, side):
    """Row b equals attention over only its kept keys (positions as given), and padding keys get zero grads."""
    lk = 9
    lens = torch.tensor([9, 4, 0])
    q, k, v = make_qkv(3, 5, lk, 2, 1, 16, torch.float64)
    qp = torch.tensor([[3, 4, 5, 6, 7]]).expand(3, -1)
    kp = torch.arange(lk)[None].expand(3, -1)
    enc = ENCODINGS[name]()
    out = fp.reference_attention(q, k, v, enc, causal=True, k_lengths=lens, padding_side=side,
                                 q_positions=qp, k_positions=kp)
    out.sum().backward()
    for b, n in enumerate(lens.tolist()):
        keys = slice(lk - n, lk) if side == "left" else slice(0, n)
        if n == 0:  # sees no key: zeros, never NaN, zero gradients
            assert (out[b] == 0).all() and (q.grad[b] == 0).all()
        else:
            want = fp.reference_attention(q[b:b + 1], k[b:b + 1, keys], v[b:b + 1, keys], enc, causal=True,
                                          q_positions=qp[b:b + 1], k_positions=kp[b:b + 1, keys])
            torch.testing.assert_close(out[b:b + 1], want, rtol=1e-12, atol=1e-12)
        pad = torch.ones(lk, dtype=torch.bool)
        pad[keys] = False
        assert (k.grad[b, pad] == 0).all() and (v.grad[b, pad] == 0).all()


def _lengths(side):  # one full row, one short, one empty
    return dict(k_lengths=torch.tensor([37, 20, 0], device=DEVICE), padding_side=side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_cpu_key_padding_matches_the_reference(name, side):
    q, k, v = make_qkv(3, 13, 37, 4, 2, 16, torch.float32, seed=3)
    kw = dict(k_lengths=torch.tensor([37, 20, 0]), padding_side=side)
    pos = dict(q_positions=torch.arange(13) * 2 + 10, k_positions=torch.arange(37)) if name == "alibi" else {}
    check_against_reference(lambda *a, **kw_: fp.fused_attention(*a, backend="cpu", **kw_), q, k, v,
                            ENCODINGS[name](), True, **kw, **pos)


@needs_triton
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["rope", "alibi", "tapa"])
def test_triton_key_padding_matches_the_reference(name, side):
    q, k, v = make_qkv(3, 13, 37, 2, 1, 16, torch.float32, DEVICE, seed=4)
    check_triton(q, k, v, ENCODINGS[name](), side == "right", window_size=(-1, -1), **_lengths(side))


def test_left_padded_prompts_decode_like_their_unpadded_rows():
    """A left-padded batch (HF ``generate``: pads first, ``position_ids`` counting real tokens from 0) with the
    pads masked equals each prompt run alone."""
    lens = [6, 3]
    lk = 6
    q, k, v = make_qkv(2, lk, lk, 2, 2, 16, torch.float64, requires_grad=False)
    pos = torch.stack([torch.arange(lk) - (lk - n) for n in lens]).clamp(min=0)
    out = fp.fused_attention(q, k, v, "rope", causal=True, q_positions=pos, k_positions=pos, backend="cpu",
                             k_lengths=torch.tensor(lens), padding_side="left")
    for b, n in enumerate(lens):
        alone = fp.fused_attention(q[b:b + 1, lk - n:], k[b:b + 1, lk - n:], v[b:b + 1, lk - n:], "rope",
                                   causal=True, backend="torch")
        torch.testing.assert_close(out[b:b + 1, lk - n:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [fp.fused_attention, fp.reference_attention])
def test_bad_key_lengths(fn):
    q, k, v = make_qkv(2, 3, 4, 1, 1, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"k_lengths must lie in \[0, 5\)"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=r"k_lengths must lie in"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"k_lengths must have shape \(2,\)"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([4]))
    with pytest.raises(TypeError, match="k_lengths must be a signed integer tensor"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([4.0, 2.0]))
    with pytest.raises(TypeError, match="k_lengths must be an integer torch.Tensor"):
        fn(q, k, v, "rope", k_lengths=[4, 2])
    with pytest.raises(ValueError, match="k_lengths is on meta"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([4, 2], device="meta"))
    with pytest.raises(ValueError, match="padding_side must be 'right'"):
        fn(q, k, v, "rope", k_lengths=torch.tensor([4, 2]), padding_side="top")
