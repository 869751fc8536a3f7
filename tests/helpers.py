"""Shared test helpers: random inputs and FlashAttention's accuracy idiom.

The idiom: a backend's error against a float64 reference may be at most ``factor`` times the
error of the same PyTorch computation run in the input dtype, plus a small absolute floor.
"""
from __future__ import annotations

import torch

from fused_posenc import reference_attention

# absolute floors per dtype (the reference in the input dtype can be near-exact on tiny problems)
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, device="cpu", headdim_v=None,
             seed=0, requires_grad=True):
    """Fresh random q, k, v (never zeros) with the package's layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dv = headdim if headdim_v is None else headdim_v

    def r(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return (r(batch, seqlen_q, nheads, headdim), r(batch, seqlen_k, nheads_kv, headdim),
            r(batch, seqlen_k, nheads_kv, dv))


def forward_backward(fn, q, k, v, do, params=()):
    """Run ``out = fn(q, k, v)`` and its backward with ``do``; return ``(out, [dq, dk, dv, *dparams])``."""
    out = fn(q, k, v)
    leaves = [q, k, v, *params]
    grads = torch.autograd.grad(out, leaves, do, allow_unused=True)
    return out.detach(), [g if g is None else g.detach() for g in grads]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_fa_close(name: str, test: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor,
                    factor: float = 2.0, floor: float | None = None) -> None:
    """``|test - ref64| <= factor * |ref_lp - ref64| + floor`` (max norm), and no NaN/Inf."""
    assert test.shape == ref64.shape, f"{name}: shape {tuple(test.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(test).all(), f"{name}: non-finite values"
    if floor is None:
        floor = FLOOR[ref_lp.dtype]
    err = max_err(test, ref64)
    base = max_err(ref_lp, ref64)
    bound = factor * base + floor
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x reference error {base:.3e} + floor {floor:.1e}"


def check_against_reference(fn, q, k, v, encoding, causal, factor=2.0, params_fn=None, floor=None, **kw):
    """Compare ``fn`` (a backend's attention with the same arguments) with the float64 reference and the
    reference in the input dtype, forward and every gradient (q, k, v and encoding parameters)."""
    g = torch.Generator().manual_seed(1234 + q.numel() + k.numel())  # the same upstream gradient in any test order
    do = torch.randn(*q.shape[:-1], v.shape[-1], generator=g).to(device=q.device, dtype=q.dtype)
    params = list(params_fn()) if params_fn else []

    def ref(q_, k_, v_):
        return reference_attention(q_, k_, v_, encoding, causal=causal, **kw)

    out, grads = forward_backward(lambda a, b, c: fn(a, b, c, encoding, causal=causal, **kw), q, k, v, do, params)
    out_lp, grads_lp = forward_backward(ref, q, k, v, do, params)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, grads64 = forward_backward(ref, q64, k64, v64, do.double(), params)
    assert_fa_close("out", out, out64, out_lp, factor, floor)
    for name, g, glp, g64 in zip(["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))], grads, grads_lp, grads64):
        assert g is not None and g64 is not None, f"{name}: missing gradient"
        assert_fa_close(name, g, g64, glp, factor, floor)


def encoding_factories(fope_seed: int = 2, head_dim: int = 16, nheads: int = 4) -> dict:
    """``name -> () -> a fresh encoding`` for the six encodings, small-test sizes (FoPE: ``head_dim``, ``nheads``
    coefficient heads, train_len 64; HoPE: train_len 64)."""
    from fused_posenc import ALiBi, FoPE, HoPE, RoPE, TAPA

    return {
        "none": lambda: "none",
        "rope": lambda: RoPE(),
        "hope": lambda: HoPE(train_len=64),
        "fope": lambda: FoPE(head_dim=head_dim, num_heads=nheads, train_len=64, seed=fope_seed),
        "alibi": lambda: ALiBi(),
        "tapa": lambda: TAPA(),
    }
