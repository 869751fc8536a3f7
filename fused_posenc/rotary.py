"""``apply_rotary``: the unfused rotation of RoPE / HoPE / FoPE (the "rotate, then SDPA" baseline)."""
from __future__ import annotations

from typing import Optional

import torch

from .attention import _positions, resolve_encoding


def apply_rotary(x: torch.Tensor, encoding="rope", positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate ``x`` ``(batch, seqlen, heads, dim)`` by a rotation encoding; returns a new tensor.

    ``positions``: integer ``(seqlen,)`` or ``(batch, seqlen)``, default ``arange(seqlen)``. For a
    per-head FoPE, ``heads`` must equal its ``num_heads`` (or the FoPE has one coefficient head).
    Angles and tables are computed in float32 (float64 for float64 ``x``); the result has x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (batch, seqlen, heads, dim) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    b, t, h, d = x.shape
    enc = resolve_encoding(encoding, d, h, x.device)
    if not enc.is_rotation:
        raise ValueError(f"apply_rotary needs a rotation encoding (rope, hope, fope), got {enc.name!r}")
    enc.validate(d, h, h, b)
    pos = _positions("positions", positions, b, t, 0, x.device)
    return enc.rotate(x, pos, h, h)
