"""What every fused backend's ``autograd.Function`` shares."""
from __future__ import annotations

import functools

import torch

DOUBLE_BACKWARD_ERROR = (
    "fused_posenc: the fused backends ('cpu', 'cuda', 'triton') compute gradients with kernels that are not "
    "themselves differentiable, so a graph of the backward (create_graph=True, e.g. a gradient penalty or "
    "Hessian-vector products) cannot be built; use backend='torch' (the differentiable reference) for that")


def single_backward(backward):
    """Decorate an ``autograd.Function.backward`` that has no derivative of its own.

    The autograd engine runs a backward with grad mode on exactly when the caller asked for a graph of it
    (``create_graph=True``). Then this raises instead of returning gradients that silently do not require
    grad (``torch.autograd.function.once_differentiable`` raises only when the upstream gradient itself
    requires grad, so ``grad(out.sum(), q, create_graph=True)`` would drop terms). Otherwise the backward
    runs as it is (grad mode is already off).
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        return backward(ctx, *grads)

    return wrapper
