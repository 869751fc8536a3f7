"""FoPE: sizes, initialisation, parameters, and the reference against the spec's formula written out here."""
import math

import pytest
import torch

from fused_posenc import FoPE, RoPE, apply_rotary, get_encoding, reference_attention


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def spec_freqs(D, L, base=10000.0):
    """Kept omega_j = base^(-2j/D) with omega_j >= 2 pi / L, as Python floats."""
    return [base ** (-2.0 * j / D) for j in range(D // 2) if base ** (-2.0 * j / D) >= 2 * math.pi / L]


@pytest.mark.parametrize("D,L,dk,dout,step", [(64, 512, 16, 16, 1), (128, 512, 31, 31, 1), (128, 1024, 36, 32, 2)])
def test_worked_sizes(D, L, dk, dout, step):
    enc = FoPE(D, num_heads=2, train_len=L, seed=0)
    assert (enc.dk, enc.dout) == (dk, dout)
    assert math.ceil(enc.dk / enc.dout) == step
    assert enc.cos_coef.shape == enc.sin_coef.shape == (2, dk, dout)
    assert enc.cos_coef.dtype == torch.float32
    torch.testing.assert_close(enc.freqs.double(), torch.tensor(spec_freqs(D, L), dtype=torch.float64),
                               rtol=1e-7, atol=0)


def test_floor_frequency_is_clipped_strictly_below():
    # D = 8, base 16: omega = 1, 1/2, 1/4, 1/8 exactly
    assert FoPE(8, train_len=26, base=16.0, seed=0).dk == 3  # 2 pi / 26 = 0.2417 <= 1/4: kept
    assert FoPE(8, train_len=25, base=16.0, seed=0).dk == 2  # 2 pi / 25 = 0.2513 > 1/4: clipped
    assert FoPE(8, train_len=51, base=16.0, seed=0).dk == 4


def _step_identity(hc, dk, dout):
    w = torch.zeros(hc, dk, dout)
    step = math.ceil(dk / dout)
    for i in range(dout):
        if i * step < dk:
            w[:, i * step, i] = 1.0
    return w


@pytest.mark.parametrize("D,L", [(64, 512), (128, 1024), (16, 1000)])
def test_sigma_zero_is_the_step_identity(D, L):
    enc = FoPE(D, num_heads=3, train_len=L, sigma=0.0, seed=0)
    want = _step_identity(3, enc.dk, enc.dout)
    assert torch.equal(enc.cos_coef.detach(), want)
    assert torch.equal(enc.sin_coef.detach(), want)


def test_step_identity_positions_dk_gt_dout():
    enc = FoPE(128, num_heads=1, train_len=1024, sigma=0.0, seed=0)  # Dk=36, Dout=32, step=2
    w = enc.cos_coef.detach()[0]
    ones = {(int(r), int(c)) for r, c in torch.nonzero(w)}
    assert ones == {(2 * i, i) for i in range(18)}  # i*2 < 36 for i <= 17; columns 18..31 start at zero


@pytest.mark.parametrize("D,L,sigma", [(64, 512, 0.3), (128, 1024, 1.0)])
def test_xavier_statistics(D, L, sigma):
    hc = 2000
    enc = FoPE(D, num_heads=hc, train_len=L, sigma=sigma, seed=123)
    dk, dout = enc.dk, enc.dout
    expected_std = sigma * math.sqrt(2.0 / (dout * (dk + hc)))
    ident = _step_identity(hc, dk, dout)
    for coef in (enc.cos_coef.detach(), enc.sin_coef.detach()):
        noise = coef - ident
        n = noise.numel()
        assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(n)
        assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
        # the identity is added on top of the noise (mean 1 at the identity entries)
        on = coef[ident.bool()]
        assert on.mean().item() == pytest.approx(1.0, abs=5 * expected_std / math.sqrt(on.numel()))
    # cos and sin are drawn independently
    assert not torch.equal(enc.cos_coef, enc.sin_coef)


def test_seed_determinism_and_global_rng_untouched():
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a = FoPE(64, num_heads=4, train_len=512, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # a private generator
    b = FoPE(64, num_heads=4, train_len=512, seed=7)
    c = FoPE(64, num_heads=4, train_len=512, seed=8)
    assert torch.equal(a.cos_coef, b.cos_coef) and torch.equal(a.sin_coef, b.sin_coef)
    assert not torch.equal(a.cos_coef, c.cos_coef)
    # get_encoding without a seed is deterministic too
    e1 = get_encoding("fope", head_dim=32, num_heads=2)
    e2 = get_encoding("fope", head_dim=32, num_heads=2)
    assert torch.equal(e1.cos_coef, e2.cos_coef) and torch.equal(e1.sin_coef, e2.sin_coef)


def test_explicit_coefficients_state_dict_and_learnable():
    D, L, hc = 16, 1000, 2
    sizes = FoPE(D, num_heads=hc, train_len=L, seed=0)
    a = torch.randn(hc, sizes.dk, sizes.dout, dtype=torch.float64)
    b = torch.randn(hc, sizes.dk, sizes.dout, dtype=torch.float64)
    enc = FoPE(D, num_heads=hc, train_len=L, cos_coef=a, sin_coef=b)
    assert torch.equal(enc.cos_coef.detach(), a.float()) and torch.equal(enc.sin_coef.detach(), b.float())
    a.add_(1.0)  # the module holds its own copy
    assert not torch.equal(enc.cos_coef.detach(), a.float())
    sd = enc.state_dict()
    assert set(sd) >= {"cos_coef", "sin_coef"}
    assert "freqs" not in sd
    assert not enc.cos_coef.requires_grad and not enc.sin_coef.requires_grad and not enc.learnable
    learn = FoPE(D, num_heads=hc, train_len=L, learnable=True, seed=0)
    assert learn.cos_coef.requires_grad and learn.sin_coef.requires_grad and learn.learnable
    assert {n for n, _ in learn.named_parameters()} == {"cos_coef", "sin_coef"}
    # a state dict round trip (checkpoint loading)
    other = FoPE(D, num_heads=hc, train_len=L, seed=99)
    other.load_state_dict(enc.state_dict())
    assert torch.equal(other.cos_coef, enc.cos_coef)


# --- the reference against the spec's formula, element by element ---------------------------------------

def fope_transform(x, pos, A, B, omega, dout):
    """Per-element loop of spec step 4-5. x: (T, D) float64 for one head; A, B: (Dk, Dout) of that head."""
    T, D = x.shape
    P = D // 2
    out = torch.empty_like(x)
    for t in range(T):
        p = int(pos[t])
        for i in range(P):
            if i < dout:
                C = sum(float(A[k, i]) * math.cos(omega[k] * p) for k in range(len(omega)))
                S = sum(float(B[k, i]) * math.sin(omega[k] * p) for k in range(len(omega)))
            else:
                C = S = 1.0
            x1, x2 = float(x[t, i]), float(x[t, i + P])
            out[t, i] = x1 * C - x2 * S
            out[t, i + P] = x2 * C + x1 * S
    return out


def fope_attention_loop(q, k, v, pos_q, pos_k, A, B, omega, dout, causal, scale=None):
    """q (Lq, H, D), k/v (Lk, Hkv, D); A/B (H, Dk, Dout) per query head. Returns (Lq, H, Dv)."""
    Lq, H, D = q.shape
    Lk, Hkv, _ = k.shape
    g = H // Hkv
    s = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(Lq, H, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        qh = fope_transform(q[:, h], pos_q, A[h], B[h], omega, dout)
        kh = fope_transform(k[:, h // g], pos_k, A[h], B[h], omega, dout)  # k with the query head's coefficients
        sc = qh @ kh.T * s
        if causal:
            sc = sc.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
        out[:, h] = sc.softmax(-1) @ v[:, h // g]
    return out


def _omega(enc):
    return [float(w) for w in enc.freqs]  # the module's float32 kept frequencies (float32 tables, as the kernels)


@pytest.mark.parametrize("D,L", [(16, 1000), (16, 64)])  # Dk=5 > Dout=4 step 2; Dk=3=Dout with one padded pair
def test_rotation_matches_formula_loop(D, L):
    enc = FoPE(D, num_heads=2, train_len=L, sigma=0.5, seed=3)
    assert spec_freqs(D, L) == pytest.approx(_omega(enc), rel=1e-7)
    x = _x(1, 5, 2, D)
    pos = torch.tensor([0, 3, 17, 250, 999])
    got = apply_rotary(x, enc, pos)
    A, B = enc.cos_coef.detach().double(), enc.sin_coef.detach().double()
    for h in range(2):
        want = fope_transform(x[0, :, h], pos, A[h], B[h], _omega(enc), enc.dout)
        torch.testing.assert_close(got[0, :, h], want, rtol=1e-10, atol=1e-10)


def test_padded_pairs_map_to_difference_and_sum():
    D, L = 16, 64  # Dk = Dout = 3: pairs 3..7 (dims 3..7 with 11..15) are padding, C = S = 1
    enc = FoPE(D, num_heads=1, train_len=L, sigma=0.3, seed=1)
    assert enc.dout == 3
    x = _x(2, 4, 1, D)
    pos = torch.tensor([0, 5, 40, 1000])
    got = apply_rotary(x, enc, pos)
    first, second = list(range(3, 8)), list(range(11, 16))
    torch.testing.assert_close(got[..., first], x[..., first] - x[..., second], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[..., second], x[..., second] + x[..., first], rtol=0, atol=1e-12)


def test_sigma_zero_equals_rope_on_kept_frequencies_plus_padding():
    D, L = 16, 64  # Dk = Dout = 3: pairs 0..2 carry omega_0..2 = RoPE's theta_0..2, pairs 3..7 padded
    enc = FoPE(D, num_heads=2, train_len=L, sigma=0.0, seed=0)
    x = _x(1, 6, 2, D)
    pos = torch.tensor([0, 1, 2, 50, 63, 500])
    got = apply_rotary(x, enc, pos)
    rope = apply_rotary(x.float(), RoPE(), pos).double()  # float32 angles like FoPE's float32 frequencies
    rot = [0, 1, 2, 8, 9, 10]
    torch.testing.assert_close(got[..., rot], rope[..., rot], rtol=1e-5, atol=1e-5)
    first, second = list(range(3, 8)), list(range(11, 16))
    torch.testing.assert_close(got[..., first], x[..., first] - x[..., second])
    torch.testing.assert_close(got[..., second], x[..., second] + x[..., first])


@pytest.mark.parametrize("hc_kind", ["nheads", "nheads_kv", "one"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_attention_matches_formula_gqa(hc_kind, causal):
    D, L, H, Hkv = 16, 1000, 4, 2
    hc = {"nheads": H, "nheads_kv": Hkv, "one": 1}[hc_kind]
    enc = FoPE(D, num_heads=hc, train_len=L, sigma=0.4, seed=11)
    q, k, v = _x(1, 3, H, D, seed=1), _x(1, 4, Hkv, D, seed=2), _x(1, 4, Hkv, 6, seed=3)
    qp, kp = torch.tensor([5, 9, 30]), torch.tensor([0, 9, 12, 31])
    got = reference_attention(q, k, v, enc, causal=causal, q_positions=qp, k_positions=kp)
    A, B = enc.cos_coef.detach().double(), enc.sin_coef.detach().double()
    if hc_kind == "nheads_kv":  # query head h uses its kv group's coefficients
        A, B = A.repeat_interleave(H // Hkv, 0), B.repeat_interleave(H // Hkv, 0)
    elif hc_kind == "one":
        A, B = A.expand(H, -1, -1), B.expand(H, -1, -1)
    want = fope_attention_loop(q[0], k[0], v[0], qp, kp, A, B, _omega(enc), enc.dout, causal)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_per_head_coefficients_matter_for_keys():
    # Hc = nheads with GQA: two query heads sharing a kv head see k transformed differently
    D, L, H, Hkv = 16, 1000, 2, 1
    enc = FoPE(D, num_heads=H, train_len=L, sigma=0.4, seed=2)
    q = _x(1, 3, 1, D, seed=1).expand(1, 3, H, D)
    k, v = _x(1, 4, Hkv, D, seed=2), _x(1, 4, Hkv, D, seed=3)
    out = reference_attention(q, k, v, enc)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])


def test_scores_not_shift_invariant_with_sigma():
    D, L = 16, 1000
    enc = FoPE(D, num_heads=1, train_len=L, sigma=0.5, seed=4)
    q, k, v = _x(1, 3, 1, D, seed=1), _x(1, 4, 1, D, seed=2), _x(1, 4, 1, D, seed=3)
    qp, kp = torch.arange(1, 4), torch.arange(4)
    a = reference_attention(q, k, v, enc, q_positions=qp, k_positions=kp)
    b = reference_attention(q, k, v, enc, q_positions=qp + 100, k_positions=kp + 100)
    assert not torch.allclose(a, b)  # expected per spec: no longer a function of m - n


def test_fope_by_name_uses_q_shape():
    q, k, v = _x(1, 4, 2, 32, seed=1), _x(1, 4, 2, 32, seed=2), _x(1, 4, 2, 32, seed=3)
    got = reference_attention(q, k, v, "fope")
    enc = get_encoding("fope", head_dim=32, num_heads=2)
    torch.testing.assert_close(got, reference_attention(q, k, v, enc), rtol=0, atol=0)
