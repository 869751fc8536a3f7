"""ALiBi: official slopes, bias -slope*|m-n| added after the softmax scale, per-batch slopes, causal or not."""
import math

import pytest
import torch

from fused_posenc import ALiBi, get_encoding, reference_attention
from fused_posenc.encodings import alibi_slopes

# -log2(slope) of the official get_slopes, written out by hand
OFFICIAL = {
    1: [8],
    2: [4, 8],
    4: [2, 4, 6, 8],
    6: [2, 4, 6, 8, 1, 3],
    8: [1, 2, 3, 4, 5, 6, 7, 8],
    12: [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5],
    16: [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8],
    20: [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 0.25, 0.75, 1.25, 1.75],
}


@pytest.mark.parametrize("H", sorted(OFFICIAL))
def test_official_slopes(H):
    s = alibi_slopes(H)
    assert s.dtype == torch.float32 and s.shape == (H,)
    want = torch.tensor([2.0 ** -e for e in OFFICIAL[H]], dtype=torch.float32)
    torch.testing.assert_close(s, want, rtol=1e-6, atol=0)
    assert torch.equal(ALiBi().slopes(H, 3, "cpu"), s[None])


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def alibi_loop(q, k, v, qp, kp, slopes, causal, scale):
    """q (B, Lq, H, D), k/v (B, Lk, Hkv, *); slopes (Bs, H) float; qp (Bp, Lq), kp (Bp, Lk)."""
    Bn, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    out = torch.zeros(Bn, Lq, H, v.shape[-1], dtype=torch.float64)
    for b in range(Bn):
        sl = slopes[b if slopes.shape[0] > 1 else 0]
        pq, pk = qp[b if qp.shape[0] > 1 else 0], kp[b if kp.shape[0] > 1 else 0]
        for h in range(H):
            for m in range(Lq):
                sc = []
                for n in range(Lk):
                    if causal and int(pk[n]) > int(pq[m]):
                        sc.append(float("-inf"))
                    else:
                        dot = float(q[b, m, h] @ k[b, n, h // g])
                        sc.append(scale * dot - float(sl[h]) * abs(int(pq[m]) - int(pk[n])))
                if all(x == float("-inf") for x in sc):
                    continue  # a query that sees no key outputs zeros
                p = torch.tensor(sc, dtype=torch.float64).softmax(0)
                out[b, m, h] = p @ v[b, :, h // g]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(6, 6), (6, 2), (4, 1)])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_reference_matches_loop(causal, H, Hkv, scale):
    q, k, v = _x(2, 4, H, 8, seed=1), _x(2, 6, Hkv, 8, seed=2), _x(2, 6, Hkv, 5, seed=3)
    qp, kp = torch.tensor([[2, 3, 4, 5]]), torch.tensor([[0, 1, 2, 3, 4, 5]])
    got = reference_attention(q, k, v, "alibi", causal=causal, softmax_scale=scale)
    s = 1 / math.sqrt(8) if scale is None else scale  # the bias is not multiplied by the scale
    want = alibi_loop(q, k, v, qp, kp, alibi_slopes(H).double()[None], causal, s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_per_batch_slopes_and_explicit_positions(causal):
    B, H = 2, 3
    slopes = torch.tensor([[0.5, 0.25, 1.0], [2.0, 0.1, 0.0]], dtype=torch.float32)
    q, k, v = _x(B, 3, H, 4, seed=4), _x(B, 5, H, 4, seed=5), _x(B, 5, H, 4, seed=6)
    qp = torch.tensor([[10, 3, 7], [0, 20, 4]])
    kp = torch.tensor([[0, 3, 9, 11, 2], [5, 4, 3, 2, 1]])
    got = reference_attention(q, k, v, ALiBi(slopes), causal=causal, q_positions=qp, k_positions=kp)
    want = alibi_loop(q, k, v, qp, kp, slopes.double(), causal, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # per-head (H,) slopes broadcast over the batch
    got1 = reference_attention(q, k, v, ALiBi(slopes[0]), causal=causal, q_positions=qp, k_positions=kp)
    want1 = alibi_loop(q, k, v, qp, kp, slopes[:1].double(), causal, 0.5)
    torch.testing.assert_close(got1, want1, rtol=1e-10, atol=1e-10)


def test_non_causal_uses_absolute_distance():
    # a key in the future is penalised like one in the past at the same distance
    H = 1
    slopes = torch.tensor([1.0])
    q = torch.zeros(1, 1, H, 4, dtype=torch.float64)
    k = torch.zeros(1, 3, H, 4, dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    out = reference_attention(q, k, v, ALiBi(slopes), q_positions=torch.tensor([1]), k_positions=torch.tensor([0, 1, 2]))
    assert out.abs().item() < 1e-15  # symmetric weights e^-1, 1, e^-1
    out = reference_attention(q, k, v, ALiBi(slopes), q_positions=torch.tensor([1]), k_positions=torch.tensor([0, 1, 3]))
    w = torch.tensor([math.exp(-1), 1.0, math.exp(-2)], dtype=torch.float64)
    assert out.item() == pytest.approx(((w / w.sum()) * torch.tensor([1.0, 0, -1], dtype=torch.float64)).sum().item(), rel=1e-12)


def test_scores_shift_invariant_and_by_name():
    q, k, v = _x(1, 3, 4, 8, seed=7), _x(1, 5, 4, 8, seed=8), _x(1, 5, 4, 8, seed=9)
    a = reference_attention(q, k, v, "alibi", causal=True)
    b = reference_attention(q, k, v, get_encoding("alibi"), causal=True, q_positions=torch.arange(2, 5) + 99,
                            k_positions=torch.arange(5) + 99)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_formed_in_float32_for_low_precision_inputs(dtype):
    # slope * |m - n| reaches thousands: in fp16/bf16 it would be rounded by whole units
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 16, generator=g).to(dtype)
    k = torch.randn(1, 3000, 8, 16, generator=g).to(dtype)
    qp, kp = torch.tensor([[2998, 2999]]), torch.arange(3000)[None]
    s_lp = ALiBi().scores(q, k, qp, kp, None)
    s64 = ALiBi().scores(q.double(), k.double(), qp, kp, None)
    dot_err = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # the q.k rounding only (|q.k|/4 < 10)
    assert (s_lp.double() - s64).abs().max().item() < dot_err
