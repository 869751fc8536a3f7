"""RoPE reference against an independent formulation: pairs as complex numbers times exp(i p theta).

Frequencies of every rescaling are recomputed here from the spec's formulas (YaRN as HF's
``modeling_rope_utils`` computes it), independently of ``fused_posenc.encodings.rope``.
"""
import math

import pytest
import torch

from fused_posenc import RoPE, apply_rotary, reference_attention

B, T, H, D = 2, 7, 3, 16


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _positions(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 3000, (t,), generator=g)


def complex_rotate(x, pos, theta, d, interleaved, att=1.0):
    """Rotate the first ``d`` dims of ``x`` (B, T, H, D) by ``att * exp(i pos theta)`` in complex arithmetic."""
    xr = x[..., :d]
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        z = torch.complex(xr[..., : d // 2], xr[..., d // 2:])
    ang = pos.to(torch.float64)[:, None] * torch.as_tensor(theta, dtype=torch.float64)[None, :]  # (T, d/2)
    w = att * torch.polar(torch.ones_like(ang), ang)
    z = z * w[None, :, None, :]
    if interleaved:
        rot = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        rot = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([rot, x[..., d:]], dim=-1)


def plain_theta(d, base=10000.0):
    return [base ** (-2.0 * i / d) for i in range(d // 2)]


def sdpa64(q, k, v, scale=None):
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k) * s
    return torch.einsum("bhmn,bnhd->bmhd", scores.softmax(-1), v)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8, 2])
def test_rotation_matches_complex_multiplication(interleaved, rotary_dim):
    x = _x(B, T, H, D)
    pos = _positions(T)
    d = D if rotary_dim is None else rotary_dim
    enc = RoPE(rotary_dim=rotary_dim, interleaved=interleaved)
    got = apply_rotary(x, enc, pos)
    want = complex_rotate(x, pos, plain_theta(d), d, interleaved)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rotary_dim", [4, 10])
def test_partial_rotary_leaves_tail_untouched_and_uses_rotated_width(rotary_dim):
    x = _x(B, T, H, D)
    pos = _positions(T)
    got = apply_rotary(x, RoPE(rotary_dim=rotary_dim), pos)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
    theta, _ = RoPE(rotary_dim=rotary_dim).frequencies(D)
    expect = torch.tensor(plain_theta(rotary_dim), dtype=torch.float64)  # theta_i = b^(-2i/d), d = rotary width
    torch.testing.assert_close(theta[: rotary_dim // 2], expect, rtol=1e-12, atol=0)
    assert torch.all(theta[rotary_dim // 2:] == 0)


def test_float32_rotation_matches_complex():
    x = _x(B, T, H, D).float()
    pos = torch.arange(T) * 37
    got = apply_rotary(x, RoPE(), pos)
    # angles in float32 (frequencies rounded to float32, integer positions exact), arithmetic in float64 here
    theta32 = torch.tensor(plain_theta(D), dtype=torch.float32)
    ang = (pos.float()[:, None] * theta32[None]).double()
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(ang), ang)[None, :, None]
    want = torch.cat([z.real, z.imag], -1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_attention_equals_rotate_then_attention(interleaved):
    q, k, v = _x(B, 5, H, D, seed=2), _x(B, 9, H, D, seed=3), _x(B, 9, H, D, seed=4)
    qp, kp = _positions(5, seed=5), _positions(9, seed=6)
    enc = RoPE(rotary_dim=12, interleaved=interleaved)
    got = reference_attention(q, k, v, enc, q_positions=qp, k_positions=kp)
    want = sdpa64(complex_rotate(q, qp, plain_theta(12), 12, interleaved),
                  complex_rotate(k, kp, plain_theta(12), 12, interleaved), v)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# --- rescalings: frequencies computed here from the spec -----------------------------------------------

def linear_theta(d, base, factor):
    return [t / factor for t in plain_theta(d, base)]


def ntk_theta(d, base, factor):
    return plain_theta(d, base * factor ** (d / (d - 2)))


def yarn_theta(d, base, factor, L0, beta_fast=32.0, beta_slow=1.0):
    """HF modeling_rope_utils._compute_yarn_parameters, written out with math only."""
    def corr_dim(num_rot):
        return d * math.log(L0 / (num_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(d // 2):
        extrap = 1.0 / (base ** (2 * i / d))
        interp = extrap / factor
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrap_factor = 1.0 - ramp
        out.append(interp * (1 - extrap_factor) + extrap * extrap_factor)
    return out, 0.1 * math.log(factor) + 1.0


def llama3_theta(d, base, factor, L0, low_ff=1.0, high_ff=4.0):
    out = []
    for t in plain_theta(d, base):
        w = 2 * math.pi / t
        if w > L0 / low_ff:
            out.append(t / factor)
        elif w < L0 / high_ff:
            out.append(t)
        else:
            g = (L0 / w - low_ff) / (high_ff - low_ff)
            out.append((1 - g) * t / factor + g * t)
    return out


SCALINGS = [
    ({"type": "linear", "factor": 4.0}, lambda d, b: (linear_theta(d, b, 4.0), 1.0)),
    ({"type": "ntk", "factor": 8.0}, lambda d, b: (ntk_theta(d, b, 8.0), 1.0)),
    ({"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
     lambda d, b: yarn_theta(d, b, 16.0, 4096)),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2},
     lambda d, b: yarn_theta(d, b, 4.0, 2048, 16.0, 2.0)),
    ({"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}, lambda d, b: (llama3_theta(d, b, 8.0, 8192), 1.0)),
    ({"type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0}, lambda d, b: (llama3_theta(d, b, 32.0, 8192, 2.0, 8.0), 1.0)),
]


@pytest.mark.parametrize("scaling,expected", SCALINGS, ids=lambda s: s["type"] if isinstance(s, dict) else "")
@pytest.mark.parametrize("d,base", [(128, 500000.0), (64, 10000.0)])
def test_scaling_frequencies(scaling, expected, d, base):
    theta_want, att_want = expected(d, base)
    theta, att = RoPE(base=base, scaling=scaling).frequencies(d)
    torch.testing.assert_close(theta, torch.tensor(theta_want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert att == pytest.approx(att_want, rel=1e-12)


def test_scalings_actually_change_frequencies():
    # guards the test above: each rescaling must differ from plain RoPE somewhere and agree somewhere
    plain = torch.tensor(plain_theta(128, 500000.0), dtype=torch.float64)
    for scaling, _ in SCALINGS:
        theta, _ = RoPE(base=500000.0, scaling=scaling).frequencies(128)
        assert not torch.allclose(theta, plain), scaling
    yarn, _ = RoPE(base=500000.0, scaling=SCALINGS[2][0]).frequencies(128)
    assert yarn[0] == plain[0] and yarn[-1] == pytest.approx(plain[-1].item() / 16.0)  # high kept, low interpolated
    ramp = (yarn / plain)[1:-1]
    assert ((ramp > 1 / 16 + 1e-9) & (ramp < 1 - 1e-9)).any()  # a real ramp in between


@pytest.mark.parametrize("scaling,expected", SCALINGS, ids=lambda s: s["type"] if isinstance(s, dict) else "")
@pytest.mark.parametrize("interleaved", [False, True])
def test_scaled_rotation_matches_complex(scaling, expected, interleaved):
    d = 12  # partial rotary: the rescaling works on the rotated width
    theta_want, att = expected(d, 10000.0)
    x = _x(B, T, H, D)
    pos = _positions(T)
    got = apply_rotary(x, RoPE(rotary_dim=d, interleaved=interleaved, scaling=scaling), pos)
    # YaRN: cos and sin are both multiplied by 0.1 ln(f) + 1 on the rotated pairs only
    want = complex_rotate(x, pos, theta_want, d, interleaved, att=att)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_yarn_logit_factor_squared_on_scores():
    scaling = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    att = 0.1 * math.log(8.0) + 1.0
    q, k = _x(1, 1, 1, D, seed=7), _x(1, 1, 1, D, seed=8)
    pos = torch.tensor([5])
    enc = RoPE(scaling=scaling)
    qr, kr = apply_rotary(q, enc, pos), apply_rotary(k, enc, pos)  # same position: angles cancel
    assert (qr * kr).sum().item() == pytest.approx(att ** 2 * (q * k).sum().item(), rel=1e-10)


@pytest.mark.parametrize("enc", [RoPE(), RoPE(interleaved=True, rotary_dim=10),
                                 RoPE(scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})],
                         ids=["half", "interleaved-partial", "yarn"])
@pytest.mark.parametrize("causal", [False, True])
def test_scores_depend_only_on_relative_position(enc, causal):
    q, k, v = _x(B, 6, H, D, seed=9), _x(B, 8, H, D, seed=10), _x(B, 8, H, D, seed=11)
    qp, kp = torch.arange(2, 8), torch.arange(8)
    base = reference_attention(q, k, v, enc, causal=causal, q_positions=qp, k_positions=kp)
    for shift in (1, 1000, -300):
        shifted = reference_attention(q, k, v, enc, causal=causal, q_positions=qp + shift, k_positions=kp + shift)
        torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)
    # and the encoding is not a no-op: changing only the relative offset changes the output
    other = reference_attention(q, k, v, enc, causal=False, q_positions=qp + 3, k_positions=kp)
    assert not torch.allclose(other, reference_attention(q, k, v, enc, causal=False, q_positions=qp, k_positions=kp))


def test_explicit_frequencies_equal_the_base_form():
    # RoPE(inv_freq=...) (how a Hugging Face model's own frequencies come in) is RoPE(base) when they agree
    from fused_posenc import RoPE
    from fused_posenc.encodings.rope import rope_frequencies

    theta, _ = rope_frequencies(16, 500.0, None)
    a, b = RoPE(base=500.0, rotary_dim=16), RoPE(inv_freq=theta, attention_factor=1.0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 24, dtype=torch.float64, generator=g) for _ in range(3))
    ra = reference_attention(q, k, v, a, causal=True)
    rb = reference_attention(q, k, v, b, causal=True)
    torch.testing.assert_close(rb, ra, rtol=0, atol=1e-14)
    c = reference_attention(q, k, v, RoPE(inv_freq=theta, attention_factor=1.5), causal=True)
    assert (c - ra).abs().max() > 1e-3  # the factor scales cos and sin
    assert repr(a) != repr(b) and "inv_freq" in repr(b)


@pytest.mark.parametrize("kw,match", [({"inv_freq": [], "attention_factor": 1.0}, "non-empty"),
                                      ({"inv_freq": [0.1, float("nan")]}, "finite"),
                                      ({"inv_freq": [0.1, 0.01], "rotary_dim": 8}, "rotary_dim"),
                                      ({"inv_freq": [0.1], "scaling": {"type": "linear", "factor": 2.0}}, "either"),
                                      ({"attention_factor": 2.0}, "goes with inv_freq")])
def test_explicit_frequencies_bad_input(kw, match):
    from fused_posenc import RoPE

    with pytest.raises(ValueError, match=match):
        RoPE(**kw)
