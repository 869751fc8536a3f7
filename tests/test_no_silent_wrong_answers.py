"""Each of these once gave a silently wrong or misleading answer (issue "Exact at any position"); each test fails
if it comes back: NaN rows on cpu, learnable ALiBi slopes, positions near the int64 limits, float32-unrepresentable
softmax scales, numpy bools, out-of-bounds reads in the private bindings, a GIL held through the kernels."""
import threading
import time

import numpy as np
import pytest
import torch

from fused_posenc import ALiBi, fused_attention, reference_attention
from fused_posenc.backends import get_backend

from helpers import make_qkv

_cpu_ok, _cpu_why = get_backend("cpu").available()
needs_cpu = pytest.mark.skipif(not _cpu_ok, reason=f"C++ extension not built: {_cpu_why}")
_triton_ok, _triton_why = get_backend("triton").available()


# --- NaN propagates per row, as SDPA's and the reference's -------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("where", ["q_row", "alibi_slope_nan", "k_row"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_nan_rows_match_the_reference(where, causal):
    q, k, v = make_qkv(1, 70, 70, 2, 1, 16, torch.float32, requires_grad=False)
    enc = "rope"
    if where == "q_row":
        q[0, 5, 1, 3] = float("nan")
    elif where == "k_row":
        k[0, 66, 0, 0] = float("inf")  # inf * 0-free dims -> +-inf scores; inf - inf in the softmax -> NaN rows
    else:
        enc = ALiBi(slopes=torch.tensor([0.5, float("nan")]))
    ref = reference_attention(q, k, v, enc, causal=causal)
    out = fused_attention(q, k, v, enc, causal=causal, backend="cpu")
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-4, rtol=1e-4)


@needs_cpu
def test_cpu_nan_row_gradients_are_nan_like_the_reference():
    """A NaN in query row 4 (causal): dq is NaN in that row only; dk and dv are NaN in every key that row sees
    (0..4), as in the reference. Beyond those, 0 * NaN products may add NaN (the materialised reference: dk[19, 0];
    the cpu kernel: keys 5..7, which share a 4-row register tile with key 4), but keys far from the diagonal
    block (16..19) stay finite on cpu."""
    q, k, v = make_qkv(1, 20, 20, 1, 1, 8, torch.float32)
    with torch.no_grad():
        q[0, 4, 0, 0] = float("nan")
    grads = {}
    for backend in ("cpu", "torch"):
        out = fused_attention(q, k, v, "none", causal=True, backend=backend)
        assert torch.equal(torch.isnan(out).any(-1).flatten(), torch.arange(20) == 4)
        grads[backend] = torch.autograd.grad(out.sum(), (q, k, v))
    rows = {"dq": torch.arange(20) == 4, "dk": torch.arange(20) <= 4, "dv": torch.arange(20) <= 4}
    for (name, want), g_cpu, g_ref in zip(rows.items(), grads["cpu"], grads["torch"]):
        for g in (g_cpu, g_ref):
            assert torch.isnan(g).all(-1).flatten()[want].all(), name
        assert torch.isfinite(g_cpu[0, 16:]).all(), name
    assert torch.equal(torch.isnan(grads["cpu"][0]).any(-1).flatten(), rows["dq"])


# --- learnable ALiBi slopes: a gradient on cpu, a clear error where there is none -----------------------------
def _slope_grad_backends():
    out = [pytest.param("cpu", marks=needs_cpu)]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok, reason=_triton_why)))
    return out


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", _slope_grad_backends())
def test_alibi_slope_gradient(backend, batched, causal, explicit):
    """dL/dslopes = -sum dS |m - n| on every backend that runs here, against the reference's autograd."""
    q, k, v = make_qkv(2, 37, 45, 4, 2, 16, torch.float32)
    shape = (2, 4) if batched else (4,)
    base = torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 0.3 + 0.01
    kw = {}
    if explicit:  # shuffled key positions
        kw["k_positions"] = torch.randperm(45, generator=torch.Generator().manual_seed(1)) + 3
    grads = {}
    for name in (backend, "torch"):
        slopes = base.clone().requires_grad_()
        out = fused_attention(q, k, v, ALiBi(slopes=slopes), causal=causal, backend=name, **kw)
        out.square().sum().backward()
        grads[name] = slopes.grad
    assert grads[backend] is not None and grads[backend].shape == base.shape
    assert grads["torch"].abs().max() > 0
    torch.testing.assert_close(grads[backend], grads["torch"], atol=2e-4, rtol=2e-4)


# --- positions --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [2**62, -(2**62) - 1, 2**63 - 1, -(2**63)])
def test_positions_outside_the_documented_range_are_refused(bad):
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, requires_grad=False)
    pos = torch.tensor([0, 1, bad, 3])
    with pytest.raises(ValueError, match=r"k_positions must lie in \[-2\^62, 2\^62\)"):
        fused_attention(q, k, v, "alibi", k_positions=pos, backend="torch")


def test_uint64_positions_are_refused():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, requires_grad=False)
    with pytest.raises(TypeError, match="q_positions.*uint64"):
        fused_attention(q, k, v, "rope", q_positions=torch.tensor([0, 1, 2, 3], dtype=torch.uint64), backend="torch")


@needs_cpu
@pytest.mark.parametrize("enc", ["alibi", "tapa", "rope"])
def test_cpu_distances_exact_near_the_limits(enc):
    """Positions near +-2^62 in one call: the cpu backend's |m - n| is formed in int64, not from doubles."""
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8, torch.float64, requires_grad=False)
    big = 2**62 - 10
    pos = torch.tensor([-big, -big + 1, -big + 3, big - 7, big - 2, big])
    ref = reference_attention(q, k, v, enc, q_positions=pos, k_positions=pos)
    out = fused_attention(q, k, v, enc, q_positions=pos, k_positions=pos, backend="cpu")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@needs_cpu
def test_cpu_alibi_distances_beyond_2_53():
    """Neighbouring keys at 2^60: distances 1, 2, 3 must stay 1, 2, 3 (a double copy of the positions rounds them
    to multiples of 256)."""
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float64, requires_grad=False)
    pos = torch.tensor([0, 2**60 + 1, 2**60 + 2, 2**60 + 3])
    enc = ALiBi(slopes=torch.tensor([1.0]))
    ref = reference_attention(q, k, v, enc, q_positions=pos, k_positions=pos)
    out = fused_attention(q, k, v, enc, q_positions=pos, k_positions=pos, backend="cpu")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


# --- scalars ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-46, 1e-40, 4e38, 1e300])
def test_softmax_scale_must_be_a_normal_float32(scale):
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="softmax_scale.*float32"):
        fused_attention(q, k, v, "none", softmax_scale=scale, backend="torch")


def test_numpy_bool_causal_is_accepted_and_bad_types_named():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, requires_grad=False)
    a = fused_attention(q, k, v, "none", causal=np.True_, backend="torch")
    b = fused_attention(q, k, v, "none", causal=True, backend="torch")
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="causal must be a bool, got numpy.int64"):
        fused_attention(q, k, v, "none", causal=np.int64(1), backend="torch")


# --- the private bindings check what they are handed ------------------------------------------------------------
def _native_args(enc, q, k, v, slopes=None):
    from fused_posenc.attention import prepare
    from fused_posenc.ops.native import _param_args

    p = prepare(q, k, v, enc, False, None, None, None)
    kp = p.encoding.kernel_params(q.shape[3], q.shape[2], k.shape[2], q.shape[0], q.device)
    if slopes is not None:
        kp.slopes = slopes
    scale = p.encoding.score_scale(q.shape[3], None)
    return p, scale, _param_args(kp, kp.fope_cos_coef, kp.fope_sin_coef, q.device)


@needs_cpu
def test_bindings_refuse_slopes_of_another_batch():
    from fused_posenc import _C

    q, k, v = make_qkv(2, 8, 8, 2, 2, 8, torch.float32, requires_grad=False)
    p, scale, args = _native_args("alibi", q, k, v, slopes=torch.rand(3, 2))
    with pytest.raises(ValueError, match="slopes must be"):
        _C.forward(q, k, v, p.q_pos, p.k_pos, False, -1, -1, 0.0, scale, *args)


@needs_cpu
@pytest.mark.parametrize("what", ["lse", "out", "dout", "out-int", "dout-int"])
def test_bindings_refuse_wrong_shapes_in_the_backward(what):
    from fused_posenc import _C

    q, k, v = make_qkv(2, 8, 8, 2, 2, 8, torch.float32, requires_grad=False)
    p, scale, args = _native_args("rope", q, k, v)
    out, lse = _C.forward(q, k, v, p.q_pos, p.k_pos, False, -1, -1, 0.0, scale, *args)
    dout = torch.randn_like(out)
    bad = {"lse": lse[:, :, :3], "out": out[:, :4], "dout": dout[:1],  # and integer tensors of the right shape
           "out-int": (out * 8).to(torch.int32), "dout-int": (dout * 8).to(torch.int64)}
    t = {"lse": lse, "out": out, "dout": dout, **{what.split("-")[0]: bad[what]}}
    with pytest.raises(ValueError, match=what.split("-")[0] + " must be"):
        _C.backward(t["dout"], q, k, v, t["out"], t["lse"], p.q_pos, p.k_pos, False, -1, -1, 0.0, scale, *args,
                    False, False)


@needs_cpu
def test_bindings_refuse_positions_out_of_range():
    from fused_posenc import _C

    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, requires_grad=False)
    p, scale, args = _native_args("tapa", q, k, v)
    bad = torch.tensor([[0, 1, 2, 2**63 - 1]])
    with pytest.raises(ValueError, match="k_pos must lie"):
        _C.forward(q, k, v, p.q_pos, bad, False, -1, -1, 0.0, scale, *args)


@needs_cpu
def test_native_calls_release_the_gil():
    """While one thread runs a long native forward, another Python thread keeps running."""
    from fused_posenc import _C

    ticks = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel on one core, the counter free to run on another
    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        for length in (1024, 1536, 2304, 3456):  # until one call is long enough to tell (machines differ)
            q, k, v = make_qkv(1, length, length, 4, 4, 64, torch.float32, requires_grad=False)
            p, scale, args = _native_args("tapa", q, k, v)
            t0, before = time.perf_counter(), ticks[0]
            _C.forward(q, k, v, p.q_pos, p.k_pos, True, -1, -1, 0.0, scale, *args)
            took, during = time.perf_counter() - t0, ticks[0] - before
            if took >= 0.15:
                break
    finally:
        stop.set()
        t.join()
        torch.set_num_threads(old)
    assert took > 0.05, f"the call took {took:.3f} s: too short to tell"
    # with the GIL held through the call the counter thread could not run at all (a few ticks at the edges)
    assert during > 1000, f"only {during} ticks in {took:.3f} s: the GIL was held"
