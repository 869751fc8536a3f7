"""ALiBi when every key is far from the query: the answer does not depend on how far.

Queries placed ``X`` past every key see distances ``|m - n| + X``: the bias of every key moves by the same
``-slope * X``, so the softmax, the output and every gradient (the slopes' too, as ``sum_n dS_n = 0``) are exactly
those at ``X = 0``. The oracle is therefore the float64 computation at ``X = 0``, where nothing is large; each
backend at ``X`` must be as accurate as it is at 0. Forming ``slope * |m - n|`` as one number (what the ``cpu``
backward once did through an lse of size ``slope * X``) loses ``ulp(slope * X)``: dq off by 9e-4 at 2^20 and by
whole units past 2^30 in float32. The Triton and CUDA kernels form that number (documented in
``encodings/alibi.py``): they are not run here.
"""
import pytest
import torch

from fused_posenc import ALiBi, fused_attention
from fused_posenc.backends import get_backend
from fused_posenc.encodings.alibi import nearest_key_distance

from helpers import make_qkv, max_err

OFFSETS = [2**20, 10**6 + 3, 2**30, 2**40 + 1, 2**61]


def _backends():
    out = [pytest.param("torch")]
    ok, why = get_backend("cpu").available()
    out.append(pytest.param("cpu", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


def _run(backend, q, k, v, slopes, offset, causal, do):
    lq, lk = q.shape[1], k.shape[1]
    kp = torch.arange(lk) * 3  # gaps: the nearest key is not the query's own position
    qp = kp[-1] + 1 + offset + torch.arange(lq)  # every query past every key: all visible when causal
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes)]
    out = fused_attention(*leaves[:3], ALiBi(slopes=leaves[3]), causal=causal, q_positions=qp, k_positions=kp,
                          backend=backend)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach(), *grads]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", _backends())
def test_far_keys_as_accurate_as_near_ones(backend, dtype, causal):
    q, k, v = make_qkv(2, 37, 45, 4, 2, 24, dtype, seed=11, requires_grad=False)
    slopes = torch.tensor([0.5, 0.25, 2.0**-5, 2.0**-8], dtype=torch.float32)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = _run("torch", q.double(), k.double(), v.double(), slopes, 0, causal, do)
    near = _run(backend, q, k, v, slopes, 0, causal, do.to(dtype))
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    for offset in OFFSETS:
        far = _run(backend, q, k, v, slopes, offset, causal, do.to(dtype))
        for name, f, n, e in zip(["out", "dq", "dk", "dv", "dslopes"], far, near, exact):
            err, base = max_err(f, e), max_err(n, e)
            assert err <= 2 * base + floor, (
                f"{backend} {dtype} causal={causal} keys {offset} away: {name} error {err:.2e} > 2 x {base:.2e} "
                f"(its error next to the keys) + {floor:g}")


def test_nearest_key_distance():
    qp = torch.tensor([[0, 5, 10, -3]])
    kp = torch.tensor([[1, 4, 9]])
    assert nearest_key_distance(qp, kp, causal=False).tolist() == [[1, 1, 1, 4]]
    # causal: only keys at or before the query; a query before every key sees none (0)
    assert nearest_key_distance(qp, kp, causal=True).tolist() == [[0, 1, 1, 0]]
    assert nearest_key_distance(qp, kp[:, :0], causal=False).tolist() == [[0, 0, 0, 0]]


def test_reference_scores_are_relative_to_the_nearest_visible_key():
    # the row's best score is O(1), not -slope * 2^50: nothing large is rounded
    q, k, _ = make_qkv(1, 3, 5, 1, 1, 8, torch.float32, seed=1, requires_grad=False)
    qp, kp = torch.tensor([[2**50, 2**50 + 1, 2**50 + 2]]), torch.arange(5)[None]
    s = ALiBi(slopes=torch.tensor([0.5])).scores(q, k, qp, kp, None, causal=True)
    assert s.abs().max().item() < 10
