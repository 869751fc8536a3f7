"""Sliding windows and logit soft-capping: the reference against brute force, and the Triton kernels against the
reference (forward and every gradient, every encoding). ``tests/test_native_window_softcap.py`` holds the ``cpu``
kernels' cases; ``tests/test_key_padding.py`` the public key lengths."""
import math

import pytest
import torch

import fused_posenc as fp
from helpers import encoding_factories, make_qkv
from triton_cases import DEVICE, check_triton, needs_triton

ENCODINGS = encoding_factories(head_dim=16, nheads=2)


def _brute(q, k, v, scores_fn, visible_fn):
    """Attention by loops over (batch, head, query): ``scores_fn(b, h, m) -> (Lk,)``, ``visible_fn(b, m) -> (Lk,)``
    bool; rows that see no key give zeros."""
    b_, lq, h_, _ = q.shape
    group = h_ // k.shape[2]
    out = torch.zeros(b_, lq, h_, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for m in range(lq):
                keep = visible_fn(b, m)
                if keep.any():
                    p = torch.softmax(scores_fn(b, h, m).masked_fill(~keep, -math.inf), -1)
                    out[b, m, h] = p @ v[b, :, h // group].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 5), (-1, 2), (5, -1), (100, 100)])
def test_reference_window_is_the_rule_on_positions(window, causal):
    """Key n is visible to query m iff q_pos[m] - left <= k_pos[n] <= q_pos[m] + right (and n <= m by position
    when causal), with positions that neither start at 0 nor ascend."""
    q, k, v = make_qkv(2, 7, 11, 2, 1, 8, torch.float64, requires_grad=False)
    g = torch.Generator().manual_seed(5)
    qp = torch.randint(0, 16, (2, 7), generator=g)
    kp = torch.randint(0, 16, (2, 11), generator=g)
    left, right = window
    got = fp.reference_attention(q, k, v, "none", causal=causal, window_size=window, q_positions=qp, k_positions=kp)

    def visible(b, m):
        d = qp[b, m] - kp[b]
        keep = torch.ones(11, dtype=torch.bool)
        if causal:
            keep &= d >= 0
        if left >= 0:
            keep &= d <= left
        if right >= 0:
            keep &= -d <= right
        return keep

    want = _brute(q, k, v, lambda b, h, m: k[b, :, 0] @ q[b, m, h] / math.sqrt(8), visible)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if window == (100, 100) and not causal:  # wider than every distance: no window
        torch.testing.assert_close(got, fp.reference_attention(q, k, v, "none", q_positions=qp, k_positions=kp))


@pytest.mark.parametrize("name", ["none", "alibi", "tapa"])
def test_reference_softcap_caps_the_encoding_score_and_not_alibis_bias(name):
    """score = c tanh(s / c) with s the encoding's score (scale applied; TAPA's whole amplitude x cos(phase)), then
    ALiBi's -slope |m - n| added uncapped."""
    c = 0.8
    q, k, v = make_qkv(1, 5, 9, 2, 2, 8, torch.float64, requires_grad=False)
    q, k = q * 3, k * 3  # scores well past the cap
    enc = fp.get_encoding(name)
    got = fp.reference_attention(q, k, v, enc, softcap=c)
    pos_q, pos_k = torch.arange(4, 9)[None], torch.arange(9)[None]
    plain = fp.get_encoding("none") if name == "alibi" else enc
    s = plain.scores(q, k, pos_q, pos_k, None)  # (1, H, Lq, Lk), uncapped
    s = c * torch.tanh(s / c)
    if name == "alibi":
        slopes = __import__("fused_posenc.encodings", fromlist=["alibi_slopes"]).alibi_slopes(2).double()
        s = s - slopes[None, :, None, None] * (pos_q[0, :, None] - pos_k[0, None, :]).abs().double()
    want = _brute(q, k, v, lambda b, h, m: s[b, h, m], lambda b, m: torch.ones(9, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, fp.reference_attention(q, k, v, enc))  # the cap changed something


def test_softcap_gradient_is_exact():
    q, k, v = make_qkv(1, 4, 6, 1, 1, 4, torch.float64)
    for name in ("none", "alibi", "tapa"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: fp.reference_attention(a, b, c, name, softcap=0.7, window_size=(2, 1)), (q, k, v))


# --- the Triton kernels ------------------------------------------------------------------------------------------
# (causal, window, softcap, explicit positions, dtype, Lq); Lk=45: several key tiles, so tiles wholly outside the
# window are skipped (default positions: from the block index; explicit: bounds.py's ranges)
CASES = [
    (True, (7, -1), None, True, torch.float32, 21),
    (False, (17, 1), 5.0, False, torch.float32, 45),  # bounds one key past a 16-key tile edge
    (False, (-1, -1), 0.9, True, torch.float16, 21),
    (True, (0, 0), 30.0, False, torch.float32, 21),
]


@needs_triton
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_triton_window_and_softcap_match_the_reference(name, case):
    causal, window, softcap, explicit, dtype, lq = CASES[case]
    if name == "fope" and case > 1:
        pytest.skip("FoPE shares the rotation path with RoPE/HoPE; two cases cover its tables")
    q, k, v = make_qkv(2, lq, 45, 2, 1, 16, dtype, DEVICE, seed=case)
    kw = {}
    if explicit:  # ascending with gaps, per batch row: the tile ranges come from bounds.py
        kw = dict(q_positions=(torch.arange(lq) * 2 + 50 + torch.tensor([[0], [7]])).to(DEVICE),
                  k_positions=(torch.arange(45) * 3 + torch.tensor([[0], [2]])).to(DEVICE))
    enc = ENCODINGS[name]()
    if name == "fope":
        enc = fp.FoPE(head_dim=16, num_heads=2, train_len=64, seed=2, learnable=True)
    check_triton(q, k, v, enc, causal, window_size=window, softcap=softcap, **kw)


# --- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [fp.fused_attention, fp.reference_attention])
def test_bad_window_and_softcap_values(fn):
    q, k, v = make_qkv(1, 3, 4, 1, 1, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="window_size's left bound must be >= 0, or -1"):
        fn(q, k, v, "rope", window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size's right bound"):
        fn(q, k, v, "rope", window_size=(0, -5))
    with pytest.raises(TypeError, match="window_size must be a pair"):
        fn(q, k, v, "rope", window_size=4)
    with pytest.raises(TypeError, match="window_size's left bound must be an int"):
        fn(q, k, v, "rope", window_size=(1.5, 0))
    for bad in (-1.0, float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            fn(q, k, v, "rope", softcap=bad)
    with pytest.raises(TypeError, match="softcap must be a positive number or None"):
        fn(q, k, v, "rope", softcap="30")
    for off in (None, 0, 0.0):  # flash-attn's softcap=0.0 is "off"
        torch.testing.assert_close(fn(q, k, v, "rope", softcap=off), fn(q, k, v, "rope"))
    torch.testing.assert_close(fn(q, k, v, "rope", window_size=[-1, -1]), fn(q, k, v, "rope"))


@pytest.mark.parametrize("fn", [fp.fused_attention, fp.reference_attention, fp.fused_attention_varlen,
                                fp.fused_attention_with_kvcache])
def test_encoding_is_required(fn):
    with pytest.raises(TypeError, match=r"encoding is required: one of \['none', 'rope'"):
        if fn in (fp.fused_attention, fp.reference_attention):
            fn(*make_qkv(1, 3, 4, 1, 1, 8, torch.float32, requires_grad=False))
        elif fn is fp.fused_attention_varlen:
            t = torch.randn(5, 1, 8)
            cu = torch.tensor([0, 2, 5], dtype=torch.int32)
            fn(t, t, t, cu, cu, 3, 3)
        else:
            with torch.no_grad():
                fn(torch.randn(1, 1, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), 2)


# --- the varlen and KV-cache entry points ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_varlen_window_and_softcap_equal_each_sequence_alone(backend):
    """Packed sequences with a window and a cap equal each sequence run alone (the window is on positions, which
    restart per sequence)."""
    lens = [9, 17, 4]
    cu = torch.tensor([0, 9, 26, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = (t[0] for t in make_qkv(1, 30, 30, 2, 1, 16, torch.float32, DEVICE, requires_grad=False))
    kw = dict(causal=True, window_size=(4, -1), softcap=3.0)
    out = fp.fused_attention_varlen(q, k, v, cu, cu, 17, 17, "rope", backend=backend, **kw)
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i]) + n)
        alone = fp.reference_attention(q[None, s], k[None, s], v[None, s], "rope", **kw)[0]
        torch.testing.assert_close(out[s], alone, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_kvcache_decoding_with_a_sliding_window(backend):
    """One decode step with window (w - 1, -1) equals attention over the last w cached keys only."""
    w, lens = 6, [20, 11]
    q, kc, vc = make_qkv(2, 1, 24, 2, 1, 16, torch.float32, DEVICE, requires_grad=False)
    with torch.no_grad():
        out = fp.fused_attention_with_kvcache(q, kc, vc, torch.tensor(lens, device=DEVICE), None, None, "alibi",
                                              window_size=(w - 1, -1), softcap=4.0, backend=backend)
    for b, n in enumerate(lens):
        alone = fp.reference_attention(q[b:b + 1], kc[b:b + 1, n - w:n], vc[b:b + 1, n - w:n], "alibi", softcap=4.0,
                                       q_positions=torch.tensor([n - 1]), k_positions=torch.arange(n - w, n))
        torch.testing.assert_close(out[b:b + 1], alone, rtol=2e-5, atol=2e-5)
