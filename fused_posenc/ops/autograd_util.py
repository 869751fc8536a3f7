"""What every fused backend's ``autograd.Function`` shares."""
from __future__ import annotations

import functools
import weakref

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


class PerEncodingCache:
    """What a backend derives from an encoding (kernel parameters, a plan), cached per encoding object and keyed
    by ``Encoding.cache_key()`` plus the call's shape (the key changes with the options and, for FoPE and given
    ALiBi slopes, with the tensors' in-place versions, so nothing stale is reused). Built under no_grad: the cache
    holds detached copies, never a graph. At most ``limit`` entries per encoding (learnable tensors make a new
    version every step); an encoding that cannot be weakly referenced is not cached."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self._store: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def get(self, enc, key, build):
        key = (enc.cache_key(), *key)
        try:
            per_enc = self._store.setdefault(enc, {})
        except TypeError:
            per_enc = {}
        value = per_enc.get(key)
        if value is None:
            with torch.no_grad():
                value = build()
            if len(per_enc) >= self.limit:
                per_enc.pop(next(iter(per_enc)))
            per_enc[key] = value
        return value

