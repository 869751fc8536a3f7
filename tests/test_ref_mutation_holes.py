"""Reference boundaries that the other reference tests do not pin (found by mutation testing).

* FoPE keeps a frequency that sits exactly on the floor ``omega_j == 2 pi / L`` (only ``<`` is clipped);
  the other boundary test never hits the equality.
* TAPA's ``Da = int(theta_split * D)`` truncates: the other split cases all have a fractional part
  below one half, where truncation and rounding agree.
"""
import math

import pytest
import torch

from fused_posenc import FoPE, TAPA, reference_attention

from test_ref_fope import spec_freqs
from test_ref_tapa import tapa_loop


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _exact_floor_cases(D=8, j=2, count=3):
    """(L, base) pairs where omega_j = base^(-2j/D) equals 2 pi / L bit for bit (base = (L / 2pi)^(D/2j))."""
    out = []
    for L in range(8, 400):
        base = (L / (2 * math.pi)) ** (D / (2 * j))
        omega = base ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D)  # as fope_sizes computes it
        if omega[j].item() == 2 * math.pi / L:
            out.append((L, base))
        if len(out) == count:
            break
    return out


def test_fope_frequency_exactly_on_the_floor_is_kept():
    cases = _exact_floor_cases()
    assert cases, "no (L, base) puts omega_2 exactly on the floor 2 pi / L"
    for L, base in cases:
        enc = FoPE(8, train_len=L, base=base, seed=0)
        # omega_0..2 kept (omega_2 == 2 pi / L), omega_3 < 2 pi / L clipped
        assert enc.dk == 3 == len(spec_freqs(8, L, base)), (L, base)
        assert enc.dout == 2


@pytest.mark.parametrize("split,D,Da", [(0.7, 8, 5), (0.36, 10, 3), (0.46, 10, 4), (0.8, 16, 12)])
def test_tapa_split_truncates_when_rounding_would_not(split, D, Da):
    assert split * D - int(split * D) > 0.5  # rounding would give Da + 1
    assert TAPA(theta_split=split).split(D) == Da


@pytest.mark.parametrize("causal", [False, True])
def test_tapa_reference_with_split_above_half(causal):
    D = 8  # theta_split 0.7: Da = int(5.6) = 5, Dp = 3
    q, k, v = _x(1, 4, 2, D, seed=1), _x(1, 6, 1, D, seed=2), _x(1, 6, 1, 3, seed=3)
    qp = torch.tensor([[2, 3, 4, 5]])
    kp = torch.tensor([[0, 1, 2, 3, 4, 5]])
    got = reference_attention(q, k, v, TAPA(theta_split=0.7, alpha=0.3), causal=causal)
    want = tapa_loop(q, k, v, qp, kp, causal, 0.7, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
