"""TAPA reference against a per-element loop of the spec formula (float64, small sizes)."""
import math

import pytest
import torch

from fused_posenc import TAPA, get_encoding, reference_attention


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def tapa_score(qv, kv, m, n, theta_split, alpha, c, user_scale):
    D = qv.numel()
    Da = min(max(int(theta_split * D), 1), D - 1)
    Dp = D - Da
    amp = sum(float(qv[j]) * float(kv[j]) for j in range(Da)) / math.sqrt(Da)
    if user_scale is not None:
        amp *= user_scale
    dotp = sum(float(qv[j]) * float(kv[j]) for j in range(Da, D))
    dist = abs(m - n)
    dpow = 0.0 if dist == 0 else dist ** alpha
    return amp * math.cos(c * dpow * dotp / math.sqrt(Dp))


def tapa_loop(q, k, v, qp, kp, causal, theta_split=0.5, alpha=0.1, c=2 * math.pi, user_scale=None):
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    out = torch.zeros(B, Lq, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        pq, pk = qp[min(b, qp.shape[0] - 1)], kp[min(b, kp.shape[0] - 1)]
        for h in range(H):
            for m in range(Lq):
                sc = []
                for n in range(Lk):
                    if causal and int(pk[n]) > int(pq[m]):
                        sc.append(float("-inf"))
                    else:
                        sc.append(tapa_score(q[b, m, h], k[b, n, h // g], int(pq[m]), int(pk[n]),
                                             theta_split, alpha, c, user_scale))
                if all(x == float("-inf") for x in sc):
                    continue  # a query that sees no key outputs zeros
                out[b, m, h] = torch.tensor(sc, dtype=torch.float64).softmax(0) @ v[b, :, h // g]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", [
    {},
    {"theta_split": 0.25},
    {"theta_split": 0.3},  # 0.3 * 8 = 2.4 -> Da = int(2.4) = 2 (truncation, not rounding)
    {"theta_split": 0.66, "alpha": 0.3},  # Da = int(5.28) = 5
    {"theta_split": 0.75, "alpha": 0.5},
    {"phase_scale": 1.0},
    {"alpha": 1.0, "phase_scale": 0.3},
    {"theta_split": 0.01},  # Da clamps to 1
    {"theta_split": 0.99},  # Da clamps to D - 1
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_reference_matches_loop(causal, opts):
    D = 8
    q, k, v = _x(1, 4, 2, D, seed=1), _x(1, 6, 1, D, seed=2), _x(1, 6, 1, 3, seed=3)
    qp = torch.tensor([[2, 3, 4, 5]])
    kp = torch.tensor([[0, 1, 2, 3, 4, 5]])
    got = reference_attention(q, k, v, TAPA(**opts), causal=causal)
    want = tapa_loop(q, k, v, qp, kp, causal, opts.get("theta_split", 0.5), opts.get("alpha", 0.1),
                     opts.get("phase_scale", 2 * math.pi))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [0.2, 3.0])
def test_softmax_scale_multiplies_amplitude(scale):
    D = 6
    q, k, v = _x(2, 3, 2, D, seed=4), _x(2, 5, 2, D, seed=5), _x(2, 5, 2, D, seed=6)
    qp = torch.tensor([[7, 1, 30], [0, 0, 4]])
    kp = torch.tensor([[0, 1, 9, 30, 2], [4, 3, 2, 1, 0]])
    got = reference_attention(q, k, v, "tapa", causal=True, softmax_scale=scale, q_positions=qp, k_positions=kp)
    want = tapa_loop(q, k, v, qp, kp, True, user_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, reference_attention(q, k, v, "tapa", causal=True, q_positions=qp, k_positions=kp))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 0.0])
def test_diagonal_score_is_amplitude_alone(alpha):
    D = 8
    enc = TAPA(alpha=alpha, phase_scale=1000.0)  # any phase would visibly change the score
    q, k = _x(1, 5, 1, D, seed=7), _x(1, 5, 1, D, seed=8)
    pos = torch.arange(5)[None]
    scores = enc.scores(q, k, pos, pos, None)  # (1, 1, 5, 5)
    amp = torch.einsum("bmhd,bnhd->bhmn", q[..., :4], k[..., :4]) / 2.0
    torch.testing.assert_close(scores.diagonal(dim1=-2, dim2=-1), amp.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
    off = ~torch.eye(5, dtype=torch.bool)
    assert not torch.allclose(scores[..., off], amp[..., off])


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_phase_argument_formed_in_float32_for_low_precision_inputs(dtype, rel):
    # |psi| in the tens to hundreds: a phase dot rounded to fp16/bf16 would be off by whole radians. On the
    # same (rounded) inputs, the low-precision scores may differ from float64 only by the rounding of
    # the amplitude and of the score itself.
    D = 16
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 2, D, generator=g) * 3).to(dtype)
    k = (torch.randn(1, 64, 2, D, generator=g) * 3).to(dtype)
    qp, kp = torch.arange(60, 64)[None], torch.arange(64)[None]
    enc = TAPA()
    s_lp = enc.scores(q, k, qp, kp, None)
    s64 = enc.scores(q.double(), k.double(), qp, kp, None)
    assert s_lp.dtype == dtype
    assert (s_lp.double() - s64).abs().max().item() < rel * s64.abs().max().item()


@pytest.mark.parametrize("split,D,Da", [(0.5, 8, 4), (0.3, 8, 2), (0.66, 8, 5), (0.01, 8, 1), (0.99, 8, 7), (0.9, 2, 1)])
def test_split_truncates_and_clamps(split, D, Da):
    assert TAPA(theta_split=split).split(D) == Da


def test_get_encoding_options():
    enc = get_encoding("tapa", theta_split=0.25, alpha=0.2, phase_scale=1.0)
    assert isinstance(enc, TAPA) and enc.split(16) == 4
    kp = enc.kernel_params(16, 2, 2, 1, "cpu")
    assert kp.tapa_split == 4 and kp.tapa_alpha == 0.2
    assert kp.tapa_phase_scale == pytest.approx(1.0 / math.sqrt(12))
    assert enc.score_scale(16, None) == pytest.approx(0.5)
