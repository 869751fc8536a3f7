"""HoPE: which pairs keep their rotation, the others are pure content channels, m - n invariance."""
import math

import pytest
import torch

from fused_posenc import HoPE, RoPE, apply_rotary, get_encoding, reference_attention


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def kept_by_spec(D, base, L, min_cycles=1.0):
    """Keep pair i iff theta_i * L / (2 pi) >= min_cycles (theta_i = base^(-2i/D))."""
    return [base ** (-2.0 * i / D) * L / (2 * math.pi) >= min_cycles for i in range(D // 2)]


def test_spec_example_keeps_46_of_64():
    kept = HoPE(base=1e4, train_len=4096).kept(128)
    assert kept.dtype == torch.bool and kept.shape == (64,)
    assert int(kept.sum()) == 46
    assert kept[:46].all() and not kept[46:].any()  # the highest frequencies are the kept ones
    assert kept.tolist() == kept_by_spec(128, 1e4, 4096)


@pytest.mark.parametrize("D,base,L,min_cycles,count", [
    (128, 1e4, 4096, 1.0, 46),
    (128, 1e4, 4096, 2.0, 41),
    (128, 1e4, 4096, 0.0, 64),
    (128, 1e4, 4096, 0.5, 50),
    (64, 1e4, 512, 1.0, 16),
    (128, 5e5, 8192, 1.0, None),
    (32, 1e4, 100, 3.0, None),
])
def test_kept_pairs_follow_spec(D, base, L, min_cycles, count):
    kept = HoPE(base=base, train_len=L, min_cycles=min_cycles).kept(D)
    want = kept_by_spec(D, base, L, min_cycles)
    assert kept.tolist() == want
    if count is not None:
        assert sum(want) == count


def test_boundary_is_inclusive():
    # base 16, D = 8: theta = 1, 1/2, 1/4, 1/8 exactly; pair 2 completes exactly min_cycles turns
    L = 1024
    mc = L * 0.25 / (2 * math.pi)
    kept = HoPE(base=16.0, train_len=L, min_cycles=mc).kept(8)
    assert kept.tolist() == [True, True, True, False]


def test_frequencies_are_rope_on_kept_and_zero_elsewhere():
    enc = HoPE(base=1e4, train_len=4096)
    theta, att = enc.frequencies(128)
    rope, _ = RoPE(base=1e4).frequencies(128)
    assert att == 1.0
    assert torch.equal(theta[:46], rope[:46])
    assert torch.all(theta[46:] == 0)


@pytest.mark.parametrize("D,L", [(128, 4096), (16, 64)])
def test_rotation_unrotated_pairs_and_rope_on_kept(D, L):
    x = _x(2, 9, 3, D)
    pos = torch.tensor([0, 1, 5, 77, 300, 1023, 4095, 9000, 123456])
    enc = HoPE(base=1e4, train_len=L)
    kept = torch.tensor(kept_by_spec(D, 1e4, L))
    assert 0 < int(kept.sum()) < D // 2  # some kept, some not
    got = apply_rotary(x, enc, pos)
    rope = apply_rotary(x, RoPE(base=1e4), pos)
    P = D // 2
    dims_kept = torch.cat([kept, kept])  # half layout: pair i is dims (i, i + D/2)
    assert torch.equal(got[..., ~dims_kept], x[..., ~dims_kept])
    torch.testing.assert_close(got[..., dims_kept], rope[..., dims_kept], rtol=0, atol=0)
    # kept pairs really rotate
    assert not torch.allclose(got[:, 1:, :, :P][..., kept], x[:, 1:, :, :P][..., kept])


def test_get_encoding_and_options():
    enc = get_encoding("hope", train_len=256, min_cycles=2)
    assert isinstance(enc, HoPE) and enc.train_len == 256 and enc.min_cycles == 2.0
    assert enc.kept(64).tolist() == kept_by_spec(64, 1e4, 256, 2.0)


@pytest.mark.parametrize("causal", [False, True])
def test_scores_depend_only_on_relative_position(causal):
    D = 32
    enc = HoPE(train_len=128)
    q, k, v = _x(2, 5, 2, D, seed=1), _x(2, 7, 2, D, seed=2), _x(2, 7, 2, D, seed=3)
    qp, kp = torch.arange(2, 7), torch.arange(7)
    base = reference_attention(q, k, v, enc, causal=causal, q_positions=qp, k_positions=kp)
    for shift in (1, 4096, 77777):
        got = reference_attention(q, k, v, enc, causal=causal, q_positions=qp + shift, k_positions=kp + shift)
        torch.testing.assert_close(got, base, rtol=1e-9, atol=1e-9)


def test_unrotated_pairs_are_content_only():
    # with only the non-kept pairs non-zero, attention does not depend on positions at all
    D, L = 32, 128
    kept = torch.tensor(kept_by_spec(D, 1e4, L))
    mask = torch.cat([~kept, ~kept]).double()
    q, k, v = _x(1, 4, 2, D, seed=4) * mask, _x(1, 6, 2, D, seed=5) * mask, _x(1, 6, 2, D, seed=6)
    a = reference_attention(q, k, v, HoPE(train_len=L), q_positions=torch.arange(4), k_positions=torch.arange(6))
    b = reference_attention(q, k, v, HoPE(train_len=L), q_positions=torch.tensor([900, 3, 17, 5000]),
                            k_positions=torch.tensor([0, 40000, 2, 8, 1, 99]))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
