"""The fused backends have no double backward: differentiating their gradients raises, never drops terms."""
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


@pytest.mark.parametrize("backend", _backends())
def test_grad_of_grad_raises(backend):
    q, k, v = make_qkv(1, 16, 16, 2, 1, 32, torch.float32)
    out = fused_attention(q, k, v, "rope", causal=True, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.square().sum().backward()


def test_reference_has_double_backward():
    q, k, v = make_qkv(1, 8, 8, 2, 1, 16, torch.float64)
    out = fused_attention(q, k, v, "rope", causal=True, backend="torch")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    dq.square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
