"""Base class of every positional encoding, and the helpers their naive math shares.

An encoding is *data*: it turns itself into a few tensors and scalars (:class:`KernelParams`) that
every backend consumes, and it carries its own naive PyTorch math (used by the reference and by
``apply_rotary``). No backend re-derives an encoding's math on its own.

Conventions used throughout the package:

* ``q``: ``(batch, seqlen_q, nheads, headdim)``, ``k``: ``(batch, seqlen_k, nheads_kv, headdim)``.
* Positions are integer tensors normalised to ``(Bp, seqlen)`` with ``Bp`` in ``{1, batch}``.
* A *rotation* encoding pairs the head dims ``(idx1[j], idx2[j])`` for ``j < P = headdim / 2`` and
  maps each pair ``(x1, x2)`` at position ``t`` to ``(x1 c - x2 s, x2 c + x1 s)`` with tables
  ``c, s`` of shape ``(Bp, seqlen, Hc, P)`` (``Hc`` = 1 or the number of query heads).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

KINDS = ("none", "rotary", "fope", "alibi", "tapa")
_LIVE: "weakref.WeakValueDictionary[int, Encoding]" = weakref.WeakValueDictionary()


def encoding_by_id(ident: int) -> "Encoding":
    """The live encoding whose ``id`` is ``ident`` (``Encoding.__new__`` records every instance)."""
    enc = _LIVE.get(ident)
    if enc is None:
        raise RuntimeError(f"fused_posenc: no live encoding has id {ident}. An encoding made inside a "
                           "torch.compile'd function has a new id on every call: construct encodings (and name "
                           "'fope' once) outside the compiled code, e.g. as a submodule of the model")
    return enc


def soft_cap(s: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """``softcap * tanh(s / softcap)`` (Gemma-2's logit soft-capping) in float32 or better; ``s`` when ``None``."""
    if softcap is None:
        return s
    wd = torch.float64 if s.dtype == torch.float64 else torch.float32
    return softcap * torch.tanh(s.to(wd) / softcap)


@dataclass
class KernelParams:
    """What a backend needs to compute one encoding inside an attention kernel.

    kind: one of ``KINDS``.
    idx1, idx2: ``(P,)`` int64 head-dim indices of the two halves of each rotated pair (rotary/fope).
    contiguous: ``idx1 == arange(P)`` and ``idx2 == arange(P, 2P)`` (the half layout over the full dim).
    pair_freqs: ``(P,)`` float64 radians per position for each pair (0 = not rotated); the kernels use
        ``pair_turns``, the same frequencies as exact turn fractions (``encodings/angles.py``):
        ``(P, 2)`` int64 128-bit words (C++/CUDA) and ``pair_turns64`` ``(P,)`` int64 (Triton).
    pair_scale: ``(P,)`` float64 multiplying both cos and sin (YaRN's attention factor on the
        rotated pairs), ones otherwise.
    fope_turns: ``(Dk, 2)`` int64: the kept frequencies as turn fractions (``FoPE.freqs`` holds them in
        float64); fope_cos_coef / fope_sin_coef: ``(H, Dk, P)``
        float32, expanded to one slice per *query* head, zero for the padded pairs ``i >= Dout``;
        fope_pad: ``(P,)`` float32, 1 for padded pairs (whose ``C = S = 1``), 0 otherwise.
    slopes: ``(Bs, H)`` float32 ALiBi slopes, ``Bs`` in ``{1, batch}``.
    tapa_*: TAPA's split ``Da``, phase scale ``c / sqrt(Dp)`` and alpha (the amplitude scale is
        ``Encoding.score_scale``).
    """

    kind: str
    idx1: Optional[torch.Tensor] = None
    idx2: Optional[torch.Tensor] = None
    contiguous: bool = True
    pair_freqs: Optional[torch.Tensor] = None
    pair_turns: Optional[torch.Tensor] = None
    pair_turns64: Optional[torch.Tensor] = None
    pair_scale: Optional[torch.Tensor] = None
    fope_turns: Optional[torch.Tensor] = None
    fope_cos_coef: Optional[torch.Tensor] = None
    fope_sin_coef: Optional[torch.Tensor] = None
    fope_pad: Optional[torch.Tensor] = None
    fope_learnable: bool = False
    slopes: Optional[torch.Tensor] = None
    tapa_split: int = 0
    tapa_phase_scale: float = 1.0
    tapa_alpha: float = 0.0
    extra: dict = field(default_factory=dict)


def half_pairs(dim: int, rotary_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the ``dim`` head dims into ``dim/2`` pairs ``(idx1[j], idx2[j])``.

    The first ``rotary_dim/2`` pairs are the rotated ones: ``(j, j + d/2)`` in the half layout,
    ``(2j, 2j+1)`` when interleaved. The pass-through dims ``d .. dim-1`` are paired too (half
    layout over the rest) so that every kernel sees exactly ``dim/2`` pairs; those pairs get a
    zero frequency, i.e. the identity.
    """
    d = rotary_dim
    j = torch.arange(d // 2)
    if interleaved:
        r1, r2 = 2 * j, 2 * j + 1
    else:
        r1, r2 = j, j + d // 2
    rest = dim - d
    jr = torch.arange(rest // 2)
    p1 = torch.cat([r1, d + jr])
    p2 = torch.cat([r2, d + rest // 2 + jr])
    return p1, p2


def is_contiguous_split(idx1: torch.Tensor, idx2: torch.Tensor) -> bool:
    p = idx1.numel()
    ar = torch.arange(p)
    return bool(torch.equal(idx1.cpu(), ar) and torch.equal(idx2.cpu(), ar + p))


def rotate_pairs(x: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`` to the pairs of ``x`` (``..., D``).

    ``cos``/``sin`` broadcast against ``x[..., idx1]``. The arithmetic runs in the tables' dtype
    (float32, or float64 for float64 inputs) and the result is cast back to ``x.dtype``.
    """
    idx1 = idx1.to(x.device)
    idx2 = idx2.to(x.device)
    wd = cos.dtype
    x1 = x[..., idx1].to(wd)
    x2 = x[..., idx2].to(wd)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    out = x.to(wd).clone()
    out[..., idx1] = y1
    out[..., idx2] = y2
    return out.to(x.dtype)


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """Angles and tables are float64 for float64 inputs, float32 otherwise (never the input dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class Encoding:
    """Base class. Subclasses set ``name`` and ``is_rotation`` and implement their hooks.

    Rotation encodings (RoPE, HoPE, FoPE) implement :meth:`pairs` and :meth:`tables`; score
    encodings (ALiBi, TAPA) implement :meth:`scores`.
    """

    name = "base"
    is_rotation = False

    def __new__(cls, *args, **kwargs):
        # every instance (copies and unpickled ones too: they are made through __new__) is findable by its id, so
        # that a torch.library op, which takes no Python objects, can be handed one (ops/native.py)
        obj = super().__new__(cls)
        _LIVE[id(obj)] = obj
        return obj

    def validate(self, head_dim: int, nheads: int, nheads_kv: int, batch: int) -> None:
        """Raise ``ValueError`` if this encoding cannot run with these shapes."""

    # --- rotation hooks -------------------------------------------------------------------------
    def pairs(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tables(self, positions: torch.Tensor, head_dim: int, nheads: int, nheads_kv: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables ``(Bp, T, Hc, P)`` for positions ``(Bp, T)``; ``Hc`` is 1 or ``nheads``."""
        raise NotImplementedError

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, nheads: int, nheads_kv: int) -> torch.Tensor:
        """Rotate ``x`` ``(B, T, Hx, D)`` whose heads are query heads (``Hx == nheads``), or kv heads
        with ``Hx == nheads_kv`` when the tables do not depend on the head."""
        cos, sin = self.tables(positions, x.shape[-1], nheads, nheads_kv, table_dtype(x.dtype))
        idx1, idx2 = self.pairs(x.shape[-1])
        return rotate_pairs(x, idx1, idx2, cos, sin)

    # --- score hooks ----------------------------------------------------------------------------
    def score_scale(self, head_dim: int, softmax_scale: Optional[float]) -> float:
        """The factor applied to ``q . k`` (to the amplitude dot for TAPA)."""
        return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               softmax_scale: Optional[float], causal: bool = False, softcap: Optional[float] = None) -> torch.Tensor:
        """Scores ``(B, H, Lq, Lk)`` from (already encoded) ``q (B,Lq,H,D)``, ``k (B,Lk,H,D)``.

        Each row is defined up to a constant (the softmax does not see it): an encoding may shift a
        row to keep its numbers small. ``causal``: the caller masks keys after the query (their scores
        are then only required to be finite). ``softcap``: the scores capped by :func:`soft_cap` (an
        additive bias, ALiBi's, comes after the cap)."""
        return soft_cap(torch.einsum("bmhd,bnhd->bhmn", q, k) * self.score_scale(q.shape[-1], softmax_scale), softcap)

    def lse_shift(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, nheads: int,
                  batch: int) -> Optional[torch.Tensor]:
        """What :meth:`scores` added to each row (broadcastable to ``(B, H, Lq)``), to subtract from a
        log-sum-exp of those scores for the true one; ``None``: nothing (ALiBi shifts its rows)."""
        return None

    # --- kernel parameters ----------------------------------------------------------------------
    def kernel_params(self, head_dim: int, nheads: int, nheads_kv: int, batch: int,
                      device: torch.device) -> KernelParams:
        raise NotImplementedError

    def cache_key(self):
        """A value that changes whenever the encoding's kernel parameters would: backends cache what
        ``kernel_params`` derives under it. Default: the repr, which lists every option."""
        return repr(self)

    def device_cached(self, what, device, build):
        """``build()``, cached per ``(cache_key(), what, device)`` on this instance: small constant tensors an
        encoding needs on the device every call (a host-to-device copy per call would stall the stream)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (self.cache_key(), what, str(device))
        if key not in cache:
            if len(cache) >= 64:  # options changed many times: drop the oldest
                cache.pop(next(iter(cache)))
            cache[key] = build()
        return cache[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
