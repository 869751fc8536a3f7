"""The fused backends have no double backward: asking for a graph of their backward raises, with a constant
upstream gradient (``grad(out.sum(), q, create_graph=True)``, which once_differentiable let through with a
gradient that silently did not require grad) and with a random one. The reference has a correct one."""
import pytest
import torch

from fused_posenc import fused_attention
from fused_posenc.backends import get_backend

from helpers import make_qkv


def _backends():
    out = []
    for name in ("cpu", "triton"):
        ok, why = get_backend(name).available()
        out.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why)))
    return out


def _upstream(kind, out):
    if kind == "constant":
        return out.sum(), None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    return out, g


@pytest.mark.parametrize("upstream", ["constant", "random"])
@pytest.mark.parametrize("backend", _backends())
def test_create_graph_raises(backend, upstream):
    q, k, v = make_qkv(1, 16, 16, 2, 1, 32, torch.float32)
    out = fused_attention(q, k, v, "rope", causal=True, backend=backend)
    target, g = _upstream(upstream, out)
    with pytest.raises(RuntimeError, match="create_graph=True.*backend='torch'"):
        torch.autograd.grad(target, q, g, create_graph=True)


@pytest.mark.parametrize("backend", _backends())
def test_first_order_gradients_still_work(backend):
    q, k, v = make_qkv(1, 16, 16, 2, 1, 32, torch.float32)
    out = fused_attention(q, k, v, "rope", causal=True, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), q)
    ref = fused_attention(q, k, v, "rope", causal=True, backend="torch")
    (dq_ref,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(dq, dq_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("upstream", ["constant", "random"])
def test_reference_double_backward_matches_float64_finite_differences(upstream):
    q, k, v = make_qkv(1, 6, 6, 2, 1, 8, torch.float64)
    g = torch.randn(1, 6, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def penalty(q_):
        out = fused_attention(q_, k, v, "rope", causal=True, backend="torch")
        target = out.sum() if upstream == "constant" else (out * g).sum()
        (dq,) = torch.autograd.grad(target, q_, create_graph=True)
        return dq.square().sum()

    assert torch.autograd.gradcheck(penalty, (q.detach().clone().requires_grad_(),))
