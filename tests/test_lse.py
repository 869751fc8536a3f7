"""return_lse=True: the log-sum-exp of each query row's true scores (natural log, -inf for rows that see no key) on
every backend that runs here, against torch.logsumexp of scores built independently; merge_attention_partials over
two disjoint key sets equals attention over all of them; gradients through the lse (and through out and lse
together) equal the float64 reference's on every backend."""
import math

import pytest
import torch

import skips
from fused_posenc import ALiBi, FoPE, fused_attention, merge_attention_partials, reference_attention
from fused_posenc.backends import get_backend
from fused_posenc.encodings.alibi import nearest_key_distance

from helpers import encoding_factories, make_qkv
from triton_cases import DEVICE as TRITON_DEVICE  # CUDA on a GPU machine, else the interpreter's CPU


def _backends():
    out = [pytest.param("torch")]
    ok, why = get_backend("cpu").available()
    out.append(pytest.param("cpu", marks=pytest.mark.skipif(not ok, reason=why)))
    why = skips.triton_skip_reason()
    out.append(pytest.param("triton", marks=pytest.mark.skipif(why is not None, reason=why or "")))
    return out


ENCODINGS = encoding_factories(fope_seed=2)


def _dev(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _on(enc, dev):
    return enc.to(dev) if isinstance(enc, torch.nn.Module) else enc


def _true_scores(q, k, enc_name, q_pos, k_pos):
    """float64 scores (B, H, Lq, Lk) written out per encoding from the package's own rotations (RoPE-family)
    and the spec's formulas (ALiBi: absolute distances in float64; TAPA: via the reference's scores, which are
    not shifted)."""
    from fused_posenc.attention import prepare

    p = prepare(q, k, q.new_empty(k.shape), ENCODINGS[enc_name](), False, None, q_pos, k_pos)
    enc = p.encoding
    q64, k64 = q.double(), k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    if enc.is_rotation:
        q64 = enc.rotate(q64, p.q_pos, q.shape[2], k.shape[2])
        k64 = enc.rotate(k64, p.k_pos, q.shape[2], k.shape[2])
    if enc.name == "tapa":
        return enc.scores(q64, k64, p.q_pos, p.k_pos, None)
    s = torch.einsum("bmhd,bnhd->bhmn", q64, k64) / math.sqrt(q.shape[-1])
    if enc.name == "alibi":
        slopes = enc.slopes(q.shape[2], q.shape[0], q.device).double()
        dist = (p.q_pos[:, :, None] - p.k_pos[:, None, :]).abs().double()
        s = s - slopes[:, :, None, None] * dist[:, None]
    return s


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("backend", _backends())
def test_lse_is_the_logsumexp_of_the_scores(backend, name, causal):
    q, k, v = make_qkv(2, 11, 13, 4, 2, 16, torch.float32, seed=3, requires_grad=False)
    # keys far before the queries (ALiBi's cpu lse is relative inside: the public one must not be) and a query
    # row before every key (causal: it sees none)
    kp = torch.arange(13) * 2 + 1000
    qp = torch.cat([torch.tensor([5]), torch.arange(10) + 5000])
    dev = _dev(backend)
    out, lse = fused_attention(q.to(dev), k.to(dev), v.to(dev), _on(ENCODINGS[name](), dev), causal=causal,
                               q_positions=qp.to(dev), k_positions=kp.to(dev), backend=backend, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert lse.shape == (2, 4, 11) and lse.dtype == torch.float32
    s = _true_scores(q, k, name, qp[None], kp[None])
    if causal:
        s = s.masked_fill(~(kp[None, :] <= qp[:, None])[None, None], float("-inf"))
    want = torch.logsumexp(s, -1)  # (B, H, Lq); -inf for the row that sees nothing
    if causal:
        assert torch.isneginf(lse[:, :, 0]).all() and torch.isneginf(want[:, :, 0]).all()
        assert (out[:, 0] == 0).all()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), want[fin], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("backend", _backends())
def test_merging_two_key_halves_equals_the_whole(backend, name):
    dev = _dev(backend)
    q, k, v = make_qkv(1, 9, 20, 4, 2, 16, torch.float32, device=dev, seed=4, requires_grad=False)
    qp, kp = torch.arange(9, device=dev) + 30, torch.arange(20, device=dev) + 17
    enc = _on(ENCODINGS[name](), dev)
    kw = dict(causal=True, q_positions=qp, backend=backend, return_lse=True)
    whole, lse = fused_attention(q, k, v, enc, k_positions=kp, **kw)
    parts = [fused_attention(q, k[:, sl], v[:, sl], enc, k_positions=kp[sl], **kw)
             for sl in (slice(0, 8), slice(8, 20))]
    out, lse_m = merge_attention_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_m, lse, rtol=1e-5, atol=1e-5)


def test_merge_rows_that_see_nothing():
    out = torch.randn(1, 3, 2, 4)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0], [float("-inf"), float("-inf"), 2.0]]])
    none = torch.full_like(lse, float("-inf"))
    o, l = merge_attention_partials([out, out * 0 + 7], [lse, none])
    torch.testing.assert_close(o, out.masked_fill(torch.isneginf(lse).transpose(1, 2)[..., None], 0.0))
    assert torch.equal(l, lse)
    with pytest.raises(ValueError, match="one length"):
        merge_attention_partials([out], [])
    with pytest.raises(ValueError, match="lses\\[0\\]"):
        merge_attention_partials([out], [lse[:, :1]])


LSE_GRAD_CASES = ["rope", "fope-learnable", "alibi-learnable", "tapa"]


def _lse_grad_encoding(name, dev):
    if name == "fope-learnable":
        return FoPE(head_dim=16, num_heads=2, train_len=64, learnable=True, seed=3).to(dev)
    if name == "alibi-learnable":
        return ALiBi(slopes=torch.tensor([0.5, 0.125], device=dev, requires_grad=True))
    return ENCODINGS[name]()


@pytest.mark.parametrize("name", LSE_GRAD_CASES)
@pytest.mark.parametrize("backend", _backends())
def test_gradients_through_the_lse(backend, name):
    # a loss of out and lse (as ring attention's merge makes): every gradient equals the float64 reference's
    # autograd; keys far from the queries (the cpu lse is relative inside)
    dev = _dev(backend)
    q, k, v = make_qkv(1, 7, 9, 2, 1, 16, torch.float32, device=dev, seed=5)
    enc = _lse_grad_encoding(name, dev)
    params = [enc.cos_coef, enc.sin_coef] if name == "fope-learnable" else [enc._slopes] if name == "alibi-learnable" \
        else []
    qp, kp = torch.arange(7, device=dev) + 300, torch.arange(9, device=dev) * 2 + 100
    g = torch.Generator().manual_seed(9)
    w_out, w_lse = torch.randn(1, 7, 2, 16, generator=g).to(dev), torch.randn(1, 2, 7, generator=g).to(dev)

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, enc, causal=True, q_positions=qp, k_positions=kp, return_lse=True)
        return (out * w_out.to(out.dtype)).sum() + (lse * w_lse.to(lse.dtype)).sum()

    got = torch.autograd.grad(loss(lambda *a, **kw: fused_attention(*a, backend=backend, **kw), q, k, v),
                              [q, k, v, *params])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(loss(reference_attention, q64, k64, v64), [q64, k64, v64, *params])
    for name_, a, b in zip(["dq", "dk", "dv", "dparam0", "dparam1"], got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-4, atol=2e-4, msg=name_)


@pytest.mark.parametrize("backend", _backends())
def test_lse_only_loss(backend):
    q, k, v = make_qkv(1, 5, 7, 2, 1, 16, torch.float32, device=_dev(backend), seed=6)
    _, lse = fused_attention(q, k, v, "rope", causal=True, backend=backend, return_lse=True)
    dq, dk = torch.autograd.grad(lse.sum(), [q, k])
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    _, lse64 = reference_attention(q64, k64, v.double(), "rope", causal=True, return_lse=True)
    wq, wk = torch.autograd.grad(lse64.sum(), [q64, k64])
    torch.testing.assert_close(dq.double(), wq, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(dk.double(), wk, rtol=2e-4, atol=2e-4)


def test_lse_differentiable_on_torch():
    q, k, v = make_qkv(1, 5, 7, 2, 1, 16, torch.float64, seed=6)
    _, lse = reference_attention(q, k, v, "alibi", causal=True, return_lse=True)
    (g,) = torch.autograd.grad(lse.sum(), q)
    assert g.abs().max() > 0


def test_nearest_key_distance_matches_brute_force():
    g = torch.Generator().manual_seed(8)
    for causal in (False, True):
        qp = torch.randint(-50, 50, (3, 17), generator=g)
        kp = torch.randint(-50, 50, (3, 23), generator=g)
        d = (qp[:, :, None] - kp[:, None, :]).abs()
        if causal:
            d = d.masked_fill(kp[:, None, :] > qp[:, :, None], 10**9)
        want = d.amin(-1)
        want = torch.where(want == 10**9, torch.zeros_like(want), want)
        assert torch.equal(nearest_key_distance(qp, kp, causal), want)
        assert torch.equal(nearest_key_distance(qp[:1], kp, causal), nearest_key_distance(qp[:1].expand(3, -1), kp,
                                                                                           causal))
