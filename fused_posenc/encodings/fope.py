"""FoPE: Fourier position embedding (Hua et al., 2024, arXiv 2412.17739), as the authors' code trains it.

Math (spec section FoPE), with ``P = D/2`` pairs in the half layout ``(i, i + D/2)``:

* kept frequencies ``K = {j : omega_j = base^(-2j/D) >= 2 pi / L}``, ``Dk = |K|``;
  ``Dout = min(Dk, D/4)`` output pairs carry a Fourier series, the rest are padding.
* ``C_h(t, i) = sum_k A[h, k, i] cos(omega_k t)``, ``S_h(t, i) = sum_k B[h, k, i] sin(omega_k t)``
  for ``i < Dout``; ``C = S = 1`` for ``Dout <= i < P`` (so such a pair maps ``(x1, x2)`` to
  ``(x1 - x2, x2 + x1)``).
* ``x1' = x1 C - x2 S``, ``x2' = x2 C + x1 S``: the rotation formula with ``(cos, sin) -> (C, S)``,
  so every rotation backend serves FoPE once it can form ``C`` and ``S``.
* Gradients of the coefficients: with ``g = dL/dx'`` on a row at position ``t``,
  ``dC = g1 x1 + g2 x2``, ``dS = g2 x1 - g1 x2`` per pair, and
  ``dA[h, k, i] = sum_t cos(omega_k t) dC_h(t, i)``, ``dB[h, k, i] = sum_t sin(omega_k t) dS_h(t, i)``.
* Heads: ``Hc`` in ``{nheads, nheads_kv, 1}``. Coefficients are expanded to one slice per query
  head (``repeat_interleave`` over a GQA group when ``Hc = nheads_kv``); a key is transformed with
  the coefficients of the query head it meets.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .angles import exact_angles, turn_limbs, turns128
from .base import Encoding, KernelParams, check_positive, half_pairs


def fope_sizes(head_dim: int, base: float, train_len: int) -> tuple[torch.Tensor, int]:
    """``(kept frequencies (Dk,) float64, Dout)`` for FoPE."""
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    omega = base ** (-2.0 * j / head_dim)
    kept = omega[omega >= 2 * math.pi / train_len]
    return kept, min(kept.numel(), head_dim // 4)


class FoPE(nn.Module, Encoding):
    """Fourier position embedding (``"fope"``), an ``nn.Module`` holding its coefficients.

    Args:
        head_dim: ``D`` (even, >= 4).
        num_heads: ``Hc``, the coefficient heads (query heads officially; kv heads or 1 accepted).
        base, train_len: frequency base and training length ``L`` (floor frequency ``2 pi / L``).
        sigma: gain of the xavier-normal initialisation (0 gives RoPE on the kept frequencies).
        learnable: make ``cos_coef``/``sin_coef`` trainable (``False``, the authors' default).
        cos_coef, sin_coef: explicit ``(Hc, Dk, Dout)`` tensors (e.g. from a checkpoint).
        seed: seed of a private generator for the initialisation (the global RNG is untouched);
            ``None`` draws from torch's global RNG, like any ``nn.Module`` initialisation.

    Attributes ``cos_coef``/``sin_coef`` are ``nn.Parameter`` ``(Hc, Dk, Dout)`` float32 and live in
    the state dict either way.
    """

    name = "fope"
    is_rotation = True

    def __init__(self, head_dim: int, num_heads: int = 1, base: float = 10000.0, train_len: int = 4096,
                 sigma: float = 0.3, learnable: bool = False, cos_coef: Optional[torch.Tensor] = None,
                 sin_coef: Optional[torch.Tensor] = None, seed: Optional[int] = None):
        super().__init__()
        for name, v in (("head_dim", head_dim), ("num_heads", num_heads), ("train_len", train_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if head_dim % 2 or head_dim < 4:
            raise ValueError(f"fope needs an even head_dim >= 4, got head_dim={head_dim}")
        self.head_dim, self.num_heads, self.train_len = head_dim, num_heads, train_len
        self.base = check_positive("base", base)
        self.sigma = check_positive("sigma", sigma, allow_zero=True)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        freqs, self.dout = fope_sizes(head_dim, self.base, train_len)
        self.dk = freqs.numel()
        if self.dk == 0:
            raise ValueError(f"fope keeps no frequency: every omega_j < 2pi/train_len (train_len={train_len})")
        # float64 frequencies (a plain attribute: module.to(dtype) must not round them), and their exact turn
        # fractions as int64 buffers that follow the module's device (encodings/angles.py)
        self.freqs = freqs
        self.register_buffer("turn_limbs", turn_limbs(freqs), persistent=False)  # (Dk, 8), PyTorch path
        self.register_buffer("turns", turns128(freqs), persistent=False)  # (Dk, 2), C++/CUDA kernels
        shape = (num_heads, self.dk, self.dout)
        if (cos_coef is None) != (sin_coef is None):
            raise ValueError("pass both cos_coef and sin_coef, or neither")
        if cos_coef is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            cos_coef, sin_coef = self._init(shape, gen), self._init(shape, gen)
        else:
            for name, c in (("cos_coef", cos_coef), ("sin_coef", sin_coef)):
                if not isinstance(c, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
                if tuple(c.shape) != shape:
                    raise ValueError(f"{name} must have shape (num_heads, Dk, Dout) = {shape}, got {tuple(c.shape)}")
                if not c.is_floating_point():
                    raise TypeError(f"{name} must be floating point, got {c.dtype}")
            cos_coef = cos_coef.detach().to(torch.float32).clone()
            sin_coef = sin_coef.detach().to(torch.float32).clone()
        self.cos_coef = nn.Parameter(cos_coef, requires_grad=learnable)
        self.sin_coef = nn.Parameter(sin_coef, requires_grad=learnable)

    def _init(self, shape, gen) -> torch.Tensor:
        w = torch.empty(shape, dtype=torch.float32)
        nn.init.xavier_normal_(w, gain=self.sigma, generator=gen)
        step = math.ceil(self.dk / self.dout)
        for i in range(self.dout):
            if i * step < self.dk:
                w[:, i * step, i] += 1.0  # the "step identity" of the authors' initialisation
        return w

    @property
    def learnable(self) -> bool:
        return self.cos_coef.requires_grad or self.sin_coef.requires_grad

    def validate(self, head_dim, nheads, nheads_kv, batch):
        if head_dim != self.head_dim:
            raise ValueError(f"this FoPE was built for headdim={self.head_dim}, got headdim={head_dim}")
        if self.num_heads not in (nheads, nheads_kv, 1):
            raise ValueError(f"FoPE num_heads={self.num_heads} must equal nheads={nheads}, "
                             f"nheads_kv={nheads_kv} or 1")

    def coef_per_query_head(self, nheads: int, nheads_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos_coef``/``sin_coef`` expanded to ``(nheads, Dk, Dout)`` (differentiable)."""
        hc = self.num_heads
        if hc == nheads:
            return self.cos_coef, self.sin_coef
        if hc == nheads_kv:
            g = nheads // nheads_kv
            return self.cos_coef.repeat_interleave(g, 0), self.sin_coef.repeat_interleave(g, 0)
        return self.cos_coef.expand(nheads, -1, -1), self.sin_coef.expand(nheads, -1, -1)

    def pairs(self, head_dim):
        return half_pairs(head_dim, head_dim, False)

    def fourier_tables(self, positions: torch.Tensor, cos_coef: torch.Tensor, sin_coef: torch.Tensor,
                       dtype: torch.dtype, sum_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, S)`` of shape ``(Bp, T, Hc', D/2)`` for positions ``(Bp, T)`` and coefficients ``(Hc', Dk, Dout)``.

        Angles ``positions * freqs`` are exact (reduced in turns, ``encodings/angles.py``) with float64 cos/sin;
        the Fourier sums run in ``sum_dtype`` (default ``dtype``: float32, or float64 for float64 inputs), the
        result is ``dtype``; padded pairs are 1.
        Differentiable w.r.t. the coefficients.
        """
        sum_dtype = sum_dtype or dtype
        dev = positions.device
        ang = exact_angles(positions, self.turn_limbs.to(dev))  # (Bp, T, Dk) float64
        c = torch.einsum("btk,hki->bthi", torch.cos(ang).to(sum_dtype), cos_coef.to(device=dev, dtype=sum_dtype))
        s = torch.einsum("btk,hki->bthi", torch.sin(ang).to(sum_dtype), sin_coef.to(device=dev, dtype=sum_dtype))
        pad = torch.ones(*c.shape[:3], self.head_dim // 2 - self.dout, dtype=dtype, device=dev)
        return torch.cat([c.to(dtype), pad], -1), torch.cat([s.to(dtype), pad], -1)

    def tables(self, positions, head_dim, nheads, nheads_kv, dtype):
        return self.fourier_tables(positions, *self.coef_per_query_head(nheads, nheads_kv), dtype)

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        idx1, idx2 = self.pairs(head_dim)
        a, b = self.coef_per_query_head(nheads, nheads_kv)
        p = head_dim // 2
        zeros = torch.zeros(nheads, self.dk, p - self.dout, device=device)
        pad = torch.zeros(p, device=device)
        pad[self.dout:] = 1.0
        return KernelParams(kind="fope", idx1=idx1.to(device), idx2=idx2.to(device), contiguous=True,
                            fope_turns=self.turns.to(device),
                            fope_cos_coef=torch.cat([a.detach().to(device), zeros], -1).contiguous(),
                            fope_sin_coef=torch.cat([b.detach().to(device), zeros], -1).contiguous(),
                            fope_pad=pad, fope_learnable=self.learnable)

    def cache_key(self):
        # the coefficients' identity and in-place version too: kernel parameters hold copies of them
        return (repr(self), id(self.cos_coef), self.cos_coef._version, id(self.sin_coef), self.sin_coef._version,
                str(self.cos_coef.device))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, base={self.base}, "
                f"train_len={self.train_len}, Dk={self.dk}, Dout={self.dout}, sigma={self.sigma}, "
                f"learnable={self.learnable}")

    def __repr__(self):
        return nn.Module.__repr__(self)
