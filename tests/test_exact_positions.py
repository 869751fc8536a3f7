"""Exact at any position: the output's error against an exact float64 attention does not grow with the position,
for every rotation encoding and every backend that runs here, float32 and float64.

The exact reference here is written independently of ``fused_posenc.encodings.angles``: angles are reduced with
Python's exact rationals (``Fraction``) and a 60-digit 2 pi, then the attention is computed in float64 from the
rotated q and k. The frequencies are the encodings' float64 ones (the definition of the angle is
``pos * theta`` with ``theta`` the float64 number ``Encoding.frequencies`` returns).
"""
import math
from fractions import Fraction

import pytest
import torch

from fused_posenc import FoPE, HoPE, RoPE, apply_rotary, fused_attention
from fused_posenc.backends import get_backend

from helpers import make_qkv

TWO_PI = Fraction("6.28318530717958647692528676655900576839433879875021164194988918461563")
POSITIONS = [0, 2**20, 10**6, 2**24 + 3, 2**30 - 64, -(2**30), -12345678]
L = 8  # rows per call; positions start..start+L-1


def exact_cos_sin(positions, freqs):
    """float64 ``(T, P)`` cos and sin of ``pos * theta`` reduced exactly."""
    c = torch.empty(len(positions), len(freqs), dtype=torch.float64)
    s = torch.empty_like(c)
    for i, p in enumerate(positions):
        for j, th in enumerate(freqs):
            x = Fraction(p) * Fraction(th)
            turns = x / TWO_PI
            r = float((turns - round(turns)) * TWO_PI)  # in [-pi, pi]
            c[i, j], s[i, j] = math.cos(r), math.sin(r)
    return c, s


def rotate_exact(x, idx1, idx2, c, s):
    """x (B, T, H, D) float64, tables (T, P) (or (T, H, P)) -> rotated float64."""
    if c.dim() == 2:
        c, s = c[None, :, None, :], s[None, :, None, :]
    else:
        c, s = c[None], s[None]
    y = x.clone()
    x1, x2 = x[..., idx1], x[..., idx2]
    y[..., idx1] = x1 * c - x2 * s
    y[..., idx2] = x2 * c + x1 * s
    return y


def exact_attention(q, k, v, enc, pos, causal):
    q, k, v = (t.detach().double() for t in (q, k, v))
    d, h = q.shape[-1], q.shape[2]
    idx1, idx2 = enc.pairs(d)
    plist = pos.tolist()
    if isinstance(enc, FoPE):
        cb, sb = exact_cos_sin(plist, enc.freqs.tolist())  # (T, Dk) Fourier basis
        a, b = (c.detach().double() for c in enc.coef_per_query_head(h, k.shape[2]))  # (H, Dk, Dout)
        ct = torch.einsum("tk,hki->thi", cb, a)
        st = torch.einsum("tk,hki->thi", sb, b)
        pad = torch.ones(len(plist), h, d // 2 - enc.dout, dtype=torch.float64)
        ct, st = torch.cat([ct, pad], -1), torch.cat([st, pad], -1)
    else:
        theta, att = enc.frequencies(d)
        ct, st = exact_cos_sin(plist, theta.tolist())
        rot = theta != 0
        scale = torch.ones(d // 2, dtype=torch.float64)
        scale[rot & (torch.arange(d // 2) < enc._d(d) // 2)] = att
        ct, st = ct * scale, st * scale
    group = h // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    qr, kr = rotate_exact(q, idx1, idx2, ct, st), rotate_exact(k, idx1, idx2, ct, st)
    s = torch.einsum("bmhd,bnhd->bhmn", qr, kr) / math.sqrt(d)
    if causal:
        s = s.masked_fill(~(pos[None, :] <= pos[:, None]), float("-inf"))
    return torch.einsum("bhmn,bnhd->bmhd", torch.softmax(s, -1), v)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


ENCODINGS = {
    "rope": lambda d, h: RoPE(),
    "rope-interleaved-partial": lambda d, h: RoPE(interleaved=True, rotary_dim=d // 2),
    "rope-yarn": lambda d, h: RoPE(scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "hope": lambda d, h: HoPE(train_len=256),
    "fope": lambda d, h: FoPE(head_dim=d, num_heads=h, train_len=256, seed=1),
}


def _backends():
    out = [pytest.param("torch")]
    for name in ("cpu", "triton"):
        ok, why = get_backend(name).available()
        out.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.mark.parametrize("start", POSITIONS)
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("backend", _backends())
def test_float32_error_independent_of_position(backend, name, start):
    d, h = 32, 2
    enc = ENCODINGS[name](d, h)
    q, k, v = make_qkv(1, L, L, h, 1, d, torch.float32, seed=start % 1000, requires_grad=False)
    pos = torch.arange(start, start + L)
    out = fused_attention(q, k, v, enc, causal=True, q_positions=pos, k_positions=pos, backend=backend)
    err = _rel(out, exact_attention(q, k, v, enc, pos, True))
    assert err <= 1e-5, f"{backend} {name} at position {start}: relative error {err:.2e} > 1e-5"


@pytest.mark.parametrize("start", POSITIONS + [2**40 + 7, -(2**61)])
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] != "triton"])
def test_float64_exact_at_any_position(backend, name, start):
    d, h = 16, 2
    enc = ENCODINGS[name](d, h)
    q, k, v = make_qkv(1, L, L, h, 2, d, torch.float64, seed=7, requires_grad=False)
    pos = torch.arange(start, start + L)
    out = fused_attention(q, k, v, enc, causal=False, q_positions=pos, k_positions=pos, backend=backend)
    err = _rel(out, exact_attention(q, k, v, enc, pos, False))
    assert err <= 1e-12, f"{backend} {name} at position {start}: relative error {err:.2e} > 1e-12"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-7), (torch.float64, 1e-14)])
@pytest.mark.parametrize("start", [0, 10**6, 2**30 - 64, -(2**30), 2**50])
def test_apply_rotary_is_exact(start, dtype, tol):
    d = 16
    x = torch.randn(2, L, 3, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    pos = torch.arange(start, start + L)
    enc = RoPE()
    theta, _ = enc.frequencies(d)
    c, s = exact_cos_sin(pos.tolist(), theta.tolist())
    idx1, idx2 = enc.pairs(d)
    want = rotate_exact(x.double(), idx1, idx2, c, s)
    got = apply_rotary(x, "rope", pos)
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= tol * 10


@pytest.mark.parametrize("start", [0, 777, 8 * 256 - L])
def test_fope_float64_tables_are_float64(start):
    """FoPE's float64 path: exact angles, float64 frequencies and Fourier sums, at positions up to 8L."""
    enc = FoPE(head_dim=16, num_heads=2, train_len=256, seed=3)
    assert enc.freqs.dtype == torch.float64
    pos = torch.arange(start, start + L)[None]
    c, s = enc.tables(pos, 16, 2, 2, torch.float64)
    assert c.dtype == torch.float64
    cb, sb = exact_cos_sin(pos[0].tolist(), enc.freqs.tolist())
    a, b = (t.detach().double() for t in enc.coef_per_query_head(2, 2))
    want_c = torch.einsum("tk,hki->thi", cb, a)
    want_s = torch.einsum("tk,hki->thi", sb, b)
    torch.testing.assert_close(c[0, :, :, : enc.dout], want_c, atol=1e-13, rtol=0)
    torch.testing.assert_close(s[0, :, :, : enc.dout], want_s, atol=1e-13, rtol=0)


def test_fope_survives_module_dtype_casts():
    """module.to(dtype) must not round FoPE's frequencies (they are no float buffer)."""
    enc = FoPE(head_dim=16, num_heads=2, train_len=256, seed=3)
    before = enc.freqs.clone()
    enc.to(torch.bfloat16)
    assert torch.equal(enc.freqs, before) and enc.turns.dtype == torch.int64
