"""ALiBi (Press et al., 2022): ``score = s * q.k - slope_h * |m - n|``.

In the causal case every visible key has ``n <= m`` so ``|m - n| = m - n``: one formula serves the
causal and the non-causal (FlashAttention) conventions. Slopes follow the official ``get_slopes``.

Exact at any distance. A row's softmax does not change when a constant is added to every score, so
the bias is formed relative to the row's nearest visible key: ``-slope * (|m - n| - r_m)`` with
``r_m = min |m - n|`` over the keys row m sees (0 when it sees none), ``|m - n| - r_m`` an exact int64
rounded once. Nothing of size ``slope * |m - n|`` is rounded, so the scores that matter (those near
the row max) carry the rounding of ``slope * (|m - n| - r_m)`` only, whatever the positions: a query
2^40 past every key gets the same accuracy as one next to them. The reference and the ``cpu``
backend (its forward and its backward, which reads the lse relative to the same ``r_m``) do this. The
``triton`` and ``cuda`` kernels form ``slope * |m - n|`` itself (r_m = 0): the same numbers whenever
every query has a key at distance 0 (the default positions, causal or not, and every prefill or
decode layout that keeps the query's own key), else a score error of about ``ulp(slope * r_m)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Encoding, KernelParams


def alibi_slopes(nheads: int) -> torch.Tensor:
    """The official ALiBi slopes for ``nheads`` heads, float32 ``(nheads,)``.

    Power of two ``H``: ``2^(-8h/H)``, h = 1..H. Otherwise the slopes of ``c = 2^floor(log2 H)``
    heads, then every other slope of the ``2c``-head list (0-based indices 0, 2, 4, ...) until there are H.
    """
    if nheads <= 0:
        raise ValueError(f"nheads must be positive, got {nheads}")

    def pow2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    c = 2 ** int(math.floor(math.log2(nheads)))
    slopes = pow2(c)
    if c < nheads:
        slopes += alibi_slopes(2 * c).tolist()[0::2][: nheads - c]
    return torch.tensor(slopes, dtype=torch.float32)


def nearest_key_distance(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """``r (Bp, Lq)`` int64: ``min |m - n|`` over the keys each query sees (``n <= m`` when ``causal``), 0
    for a query that sees none. ``q_pos (Bq, Lq)``, ``k_pos (Bk, Lk)`` int64, ``Bq, Bk`` in ``{1, Bp}``.
    O((Lq + Lk) log Lk): the keys sorted, each query's neighbours by a binary search (no device sync)."""
    bp = max(q_pos.shape[0], k_pos.shape[0])
    q_pos, k_pos = q_pos.expand(bp, -1).contiguous(), k_pos.expand(bp, -1)
    if k_pos.shape[1] == 0:
        return torch.zeros_like(q_pos)
    keys = k_pos.sort(dim=-1).values  # (Bp, Lk)
    after = torch.searchsorted(keys, q_pos, right=True)  # (Bp, Lq): keys[.., after - 1] <= m < keys[.., after]
    big = torch.iinfo(torch.int64).max
    lk = keys.shape[1]
    below = keys.gather(1, (after - 1).clamp(min=0))
    r = torch.where(after > 0, q_pos - below, torch.full_like(q_pos, big))
    if not causal:
        above = keys.gather(1, after.clamp(max=lk - 1))
        r = torch.minimum(r, torch.where(after < lk, above - q_pos, torch.full_like(q_pos, big)))
    return torch.where(r == big, torch.zeros_like(r), r)


class ALiBi(Encoding):
    """Attention with linear biases (``"alibi"``).

    Args:
        slopes: ``None`` (official slopes from the query head count), or a float32 tensor of shape
            ``(H,)`` or ``(batch, H)``.
    """

    name = "alibi"

    def __init__(self, slopes: Optional[torch.Tensor] = None):
        if slopes is not None:
            if not isinstance(slopes, torch.Tensor):
                raise TypeError(f"slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
            if slopes.dtype != torch.float32:
                raise TypeError(f"slopes must be float32, got {slopes.dtype}")
            if slopes.dim() not in (1, 2) or slopes.numel() == 0:
                raise ValueError(f"slopes must have shape (H,) or (batch, H), got {tuple(slopes.shape)}")
        self._slopes = slopes

    def validate(self, head_dim, nheads, nheads_kv, batch):
        s = self._slopes
        if s is None:
            return
        if s.shape[-1] != nheads or (s.dim() == 2 and s.shape[0] != batch):
            raise ValueError(f"slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(s.shape)}")

    def slopes(self, nheads: int, batch: int, device) -> torch.Tensor:
        """``(Bs, H)`` float32 with ``Bs`` in ``{1, batch}``."""
        if self._slopes is None:
            s = self.device_cached(("slopes", nheads), device, lambda: alibi_slopes(nheads).to(device))
        else:
            s = self._slopes.to(device=device, dtype=torch.float32)
        return s[None] if s.dim() == 1 else s

    def scores(self, q, k, q_pos, k_pos, softmax_scale, causal=False, softcap=None):
        # the bias is formed in float32 (float64 for float64 inputs), as the kernels do: in fp16/bf16,
        # slope * |m - n| would be rounded by up to a whole unit at long distances; each row relative
        # to its nearest visible key (module docstring)
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        base = super().scores(q, k, q_pos, k_pos, softmax_scale, softcap=softcap).to(wd)  # the bias is not capped
        slopes = self.slopes(q.shape[2], q.shape[0], q.device).to(wd)  # (Bs, H)
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs()  # (Bp, Lq, Lk) int64, exact
        rel = (dist - nearest_key_distance(q_pos, k_pos, causal)[:, :, None]).to(wd)
        return base - slopes[:, :, None, None] * rel[:, None]

    def lse_shift(self, q_pos, k_pos, causal, nheads, batch):
        """``(Bs or Bp, H, Lq)`` float64: what :meth:`scores` added to each row (``slope * r_m``), to subtract
        from a log-sum-exp of those scores for the true one."""
        slopes = self.slopes(nheads, batch, q_pos.device).double()  # (Bs, H)
        return slopes[:, :, None] * nearest_key_distance(q_pos, k_pos, causal).double()[:, None, :]

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        return KernelParams(kind="alibi", slopes=self.slopes(nheads, batch, device).contiguous())

    def cache_key(self):
        s = self._slopes  # a caller's tensor: its identity and in-place version, not its values (no sync)
        return repr(self) if s is None else (repr(self), id(s), s._version)

    def __repr__(self):
        return f"ALiBi(slopes={'default' if self._slopes is None else tuple(self._slopes.shape)})"
