"""backend="cpu" (the C++ kernels) with sliding windows and logit soft-capping against the reference: forward and
every gradient (q, k, v, FoPE's learnable coefficients, ALiBi's learnable slopes) in float64 and float32.

The kernels' blocks are 64 queries x 64 keys (csrc/cpu/attention_cpu.cpp BQ, BK): Lk = 150 gives three key tiles,
so windows skip whole tiles (Plan::visible), cut others (Plan::masked, mask_ranges) and leave some untouched."""
import pytest
import torch

from fused_posenc import ALiBi, FoPE, fused_attention, reference_attention
from fused_posenc.backends import get_backend

from helpers import check_against_reference, encoding_factories, make_qkv, max_err

_ok, _why = get_backend("cpu").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")

ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]
# (window_size, softcap): windows on one side, both, none, (0, 0), wider than the sequences; caps below and above
# the scores' size (0.5: every score near the cap; 30: nearly linear), with and without a window
OPTS = [((-1, -1), 0.5), ((-1, -1), 30.0), ((0, 0), None), ((1, 0), None), ((3, 5), None), ((-1, 2), None),
        ((5, -1), None), ((1000, 1000), None), ((3, 5), 0.5), ((-1, 2), 30.0), ((5, -1), 2.0)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}  # relative to the largest exact value (at least 1)


def _learnable(name, h=4, d=16):
    """(encoding, its learnable parameters) for the six encodings; FoPE's coefficients and ALiBi's slopes learn."""
    if name == "fope":
        enc = FoPE(head_dim=d, num_heads=h, train_len=64, learnable=True, seed=2)
        return enc, [enc.cos_coef, enc.sin_coef]
    if name == "alibi":
        slopes = (torch.rand(h, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.05).requires_grad_()
        return ALiBi(slopes=slopes), [slopes]
    return encoding_factories(head_dim=d, nheads=h)[name](), []


def _grads(fn, q, k, v, do, params):
    out = fn(q, k, v)
    return [out.detach(), *(g.detach() for g in torch.autograd.grad(out, [q, k, v, *params], do))]


def check(name, causal, window, softcap, dtype, lq=37, lk=150, b=1, h=4, hkv=2, d=16, **pos):
    """cpu in ``dtype`` against the float64 reference: out, dq, dk, dv and the parameter gradients."""
    enc, params = _learnable(name, h, d)
    q, k, v = make_qkv(b, lq, lk, h, hkv, d, dtype, seed=lq * 7 + lk)
    do = torch.randn(b, lq, h, d, generator=torch.Generator().manual_seed(lk)).to(dtype)
    kw = dict(causal=causal, window_size=window, softcap=softcap, **pos)
    got = _grads(lambda *t: fused_attention(*t, enc, backend="cpu", **kw), q, k, v, do, params)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _grads(lambda *t: reference_attention(*t, enc, **kw), q64, k64, v64, do.double(), params)
    names = ["out", "dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]
    for n, x, r in zip(names, got, ref):
        assert x.shape == r.shape and torch.isfinite(x).all(), n
        # parameter gradients are float32 whatever the inputs are
        tol = TOL[torch.float32 if n.startswith("dparam") else dtype] * max(1.0, r.abs().max().item())
        err = max_err(x, r)
        assert err <= tol, f"{name} causal={causal} window={window} softcap={softcap} {n}: error {err:.3e} > {tol:.1e}"
    return got


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_encodings(name, causal, dtype):
    for window, softcap in OPTS:
        check(name, causal, window, softcap, dtype)


@pytest.mark.parametrize("name", ENCODINGS)
def test_explicit_positions(name):
    # per-batch, gapped, negative and shuffled positions (not ascending: the sub-tile ranges fall back to whole
    # tiles), Lq > Lk, two query blocks
    g = torch.Generator().manual_seed(3)
    qp = torch.stack([torch.randperm(70, generator=g) * 3 - 40, torch.arange(70) * 2])
    kp = torch.stack([torch.arange(53) * 4 - 60, torch.randperm(53, generator=g) * 3])
    for causal, window, softcap in [(True, (7, -1), None), (False, (4, 9), 2.0), (False, (-1, 0), 0.5)]:
        check(name, causal, window, softcap, torch.float64, lq=70, lk=53, b=2, q_positions=qp, k_positions=kp)


@pytest.mark.parametrize("name", ["none", "rope", "alibi", "tapa"])
def test_tile_skipping_long_keys(name):
    # 9 key tiles, a narrow window: most (query block, key tile) pairs skipped, the others cut inside a tile. With
    # the default positions (queries at 460..559) the nearest pair of the first query block and tile 6 (keys
    # 384..447) is 13 apart; with queries at 300..399 the first block (300..363) is 45 after tile 3's last key (255)
    # and 21 before tile 6's first one (384): windows that end exactly there must not skip those tiles
    late = torch.arange(100) + 300
    for window, causal, pos in [((4, 4), False, {}), ((13, -1), True, {}), ((-1, 70), False, {}),
                                ((45, 21), False, {"q_positions": late}), ((44, 20), False, {"q_positions": late})]:
        check(name, causal, window, 1.5, torch.float32, lq=100, lk=560, hkv=4, **pos)


def test_rows_that_see_no_key():
    # odd query positions, even key positions: (0, 0) leaves every row empty (zeros out, zero gradients);
    # (1, 0) one key per row, (0, 1) the next one; and queries beyond every key
    qp, kp = torch.arange(37) * 2 + 1, torch.arange(150) * 2
    for name in ("none", "alibi", "tapa"):
        for window in ((0, 0), (1, 0), (0, 1)):
            got = check(name, False, window, 3.0, torch.float64, q_positions=qp, k_positions=kp)
            if window == (0, 0):
                assert all(t.abs().max() == 0 for t in got[:4])
        check(name, False, (5, 5), None, torch.float64, q_positions=qp + 400, k_positions=kp)


def test_positions_near_the_limit():
    # distances near 2^63 (queries at ~2^62, keys at ~-2^62 and next to the queries): the window's difference
    # test is exact in int64, and so are the tile bounds (no overflow)
    top = (1 << 62) - 100
    qp = torch.arange(37) + top
    kp = torch.cat([torch.arange(75) - (1 << 62), torch.arange(75) + top - 20])
    for name in ("none", "alibi"):
        for causal, window in [(True, (10, 3)), (True, ((1 << 63) - 1, 0)), (False, (-1, (1 << 63) - 1)),
                               (False, (30, -1)), (False, (-1, 5))]:
            check(name, causal, window, 2.0, torch.float64, q_positions=qp, k_positions=kp)


@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap_accuracy_float32(cap):
    # each query sees only its own key (window (0, 0)), so its lse is the capped score itself: cap tanh(s / cap) for
    # s / cap from 0 (relative accuracy of tiny scores) through the polynomial / exponential switch of the kernels'
    # tanh (0.625) to 20 (tanh = 1), and dlse/dq = (1 - t^2) scale k; float32 at a few units of rounding
    n, d = 200, 16
    k = torch.randn(1, n, 1, d, generator=torch.Generator().manual_seed(1))
    x = torch.cat([torch.linspace(-20, 20, n - 8), torch.tensor([1e-6, -1e-4, 0.6249, 0.6251, -0.625, 16, -17, 0.0])])
    scale = d ** -0.5
    q = (k * (x * cap / scale / k.square().sum(-1).squeeze(-1))[..., None, None]).requires_grad_()
    _, lse = fused_attention(q, k, k, "none", backend="cpu", window_size=(0, 0), softcap=cap, return_lse=True)
    s64 = (q.detach().double() * k.double()).sum(-1).squeeze(-1) * scale  # (1, n)
    t = torch.tanh(s64 / cap)
    assert max_err(lse[0], cap * t) <= 4e-7 * cap
    (dq,) = torch.autograd.grad(lse.sum(), [q])
    assert max_err(dq, ((1 - t * t) * scale)[..., None, None] * k.double()) <= 1e-6 * k.abs().max()


@pytest.mark.parametrize("name", ENCODINGS)
def test_lse_and_its_gradient(name):
    enc, _ = _learnable(name)
    q, k, v = make_qkv(2, 37, 150, 4, 2, 16, torch.float64, seed=9)
    kw = dict(causal=True, window_size=(9, -1), softcap=1.0, return_lse=True)
    out, lse = fused_attention(q, k, v, enc, backend="cpu", **kw)
    out_r, lse_r = reference_attention(q, k, v, enc, **kw)
    assert max_err(out, out_r) < 1e-10 and max_err(lse, lse_r) < 1e-10
    g = torch.autograd.grad((out.sum() + (lse * lse.detach()).sum()), [q, k, v])
    g_r = torch.autograd.grad((out_r.sum() + (lse_r * lse_r.detach()).sum()), [q, k, v])
    for x, r in zip(g, g_r):
        assert max_err(x, r) < 1e-10 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # the test suite's idiom: the error at most twice the reference's own in the dtype, plus a floor
    for name in ("rope", "alibi", "tapa"):
        q, k, v = make_qkv(1, 37, 150, 4, 2, 16, dtype, seed=11)
        check_against_reference(lambda *a, **kw: fused_attention(*a, backend="cpu", **kw), q, k, v,
                                encoding_factories()[name](), True, window_size=(12, -1), softcap=5.0)


def test_bindings_refuse_bad_windows_and_caps():
    from fused_posenc import _C
    from fused_posenc.attention import prepare
    from fused_posenc.ops.native import _param_args

    q, k, v = make_qkv(1, 8, 8, 2, 2, 8, torch.float32, requires_grad=False)
    p = prepare(q, k, v, "rope", False, None, None, None)
    kp = p.encoding.kernel_params(8, 2, 2, 1, q.device)
    args = _param_args(kp, kp.fope_cos_coef, kp.fope_sin_coef, q.device)
    scale = p.encoding.score_scale(8, None)

    def fwd(wl, wr, cap):
        return _C.forward(q, k, v, p.q_pos, p.k_pos, False, wl, wr, cap, scale, *args)

    out, lse = fwd(-1, -1, 0.0)
    for wl, wr, cap, what in [(-2, 0, 0.0, "window_left"), (0, -3, 0.0, "window_right"), (0, 0, -1.0, "softcap"),
                              (-1, -1, float("nan"), "softcap"), (-1, -1, float("inf"), "softcap"),
                              (-1, -1, 1e-50, "softcap"), (-1, -1, 1e39, "softcap")]:
        with pytest.raises(ValueError, match=what + " must be"):
            fwd(wl, wr, cap)
        with pytest.raises(ValueError, match=what + " must be"):
            _C.backward(torch.ones_like(out), q, k, v, out, lse, p.q_pos, p.k_pos, False, wl, wr, cap, scale, *args,
                        False, False)
    # a window wider than every distance and an enormous cap change nothing
    assert torch.allclose(fwd(1 << 40, 1 << 40, 1e30)[0], out, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph():
    # the window and the cap are plain int / float arguments of the custom ops: one graph, no break
    q, k, v = make_qkv(1, 37, 150, 4, 2, 16, torch.float64)

    def f(q, k, v):
        return fused_attention(q, k, v, "rope", causal=True, backend="cpu", window_size=(9, -1), softcap=2.0)

    def run(fn):
        out = fn(q, k, v)
        return [out, *torch.autograd.grad(out.square().sum(), [q, k, v])]

    got, want = run(torch.compile(f, fullgraph=True, backend="aot_eager")), run(f)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
