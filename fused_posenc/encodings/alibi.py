"""ALiBi (Press et al., 2022): ``score = s * q.k - slope_h * |m - n|``.

In the causal case every visible key has ``n <= m`` so ``|m - n| = m - n``: one formula serves the
causal and the non-causal (FlashAttention) conventions. Slopes follow the official ``get_slopes``.
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

    def scores(self, q, k, q_pos, k_pos, softmax_scale):
        # the bias is formed in float32 (float64 for float64 inputs), as the kernels do: in fp16/bf16,
        # slope * |m - n| would be rounded by up to a whole unit at long distances
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        base = super().scores(q, k, q_pos, k_pos, softmax_scale).to(wd)
        slopes = self.slopes(q.shape[2], q.shape[0], q.device).to(wd)  # (Bs, H)
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(wd)  # (Bp, Lq, Lk)
        return base - slopes[:, :, None, None] * dist[:, None]

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        return KernelParams(kind="alibi", slopes=self.slopes(nheads, batch, device).contiguous())

    def cache_key(self):
        s = self._slopes  # a caller's tensor: its identity and in-place version, not its values (no sync)
        return repr(self) if s is None else (repr(self), id(s), s._version)

    def __repr__(self):
        return f"ALiBi(slopes={'default' if self._slopes is None else tuple(self._slopes.shape)})"
