"""Causal tile bounds for caller-given positions, computed on the device (no host sync).

With default positions the causal rule ``k_pos[n] <= q_pos[m]`` is ``n <= m + (Lk - Lq)`` and the kernels derive
their loop bounds from the block index. With caller-given positions (Hugging Face models always pass
``position_ids``) they cannot, so this pre-pass summarises the positions in chunks of ``CHUNK`` rows (every
block size is a multiple of it):

* ``kend[b, c]``: the keys a query chunk ``c`` can see form the prefix ``[0, kend)`` when the row's key positions
  ascend (``searchsorted(k_pos[b], max of the chunk's query positions, right=True)``); ``Lk`` otherwise.
* ``qstart[b, c]``: the queries that can see key chunk ``c`` form the suffix ``[qstart, Lq)`` when the row's query
  positions ascend (``searchsorted(q_pos[b], min of the chunk's key positions)``); 0 otherwise.

The forward and dq kernels loop over ``[0, max kend of the block's chunks)``, the dk/dv kernel over
``[min qstart of its chunks, Lq)``; the per-element causal mask stays, so the bounds only skip tiles that would be
all masked, and a row order that does not ascend merely skips nothing.
"""
from __future__ import annotations

import torch

CHUNK = 16
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1


def _chunked(pos: torch.Tensor, fill: int, reduce: str) -> torch.Tensor:
    """``(B, ceil(L / CHUNK))`` max or min of each chunk of ``pos (B, L)``, padding ignored."""
    b, n = pos.shape
    pad = (-n) % CHUNK
    if pad:
        pos = torch.cat([pos, pos.new_full((b, pad), fill)], 1)
    pos = pos.view(b, -1, CHUNK)
    return pos.amax(-1) if reduce == "max" else pos.amin(-1)


def _ascending(pos: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` bool: whether each row is non-decreasing."""
    if pos.shape[1] < 2:
        return torch.ones(pos.shape[0], 1, dtype=torch.bool, device=pos.device)
    return (pos[:, 1:] >= pos[:, :-1]).all(1, keepdim=True)


def causal_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kend (Bb, ceil(Lq/16)), qstart (Bb, ceil(Lk/16)))`` int32 for ``q_pos (Bq, Lq)``, ``k_pos (Bk, Lk)`` int64,
    ``Bb = max(Bq, Bk)``; see the module docstring."""
    bb = max(q_pos.shape[0], k_pos.shape[0])
    qp = q_pos.expand(bb, -1).contiguous()
    kp = k_pos.expand(bb, -1).contiguous()
    lk = kp.shape[1]
    qmax = _chunked(qp, _I64_MIN, "max")  # (Bb, nq)
    kmin = _chunked(kp, _I64_MAX, "min")  # (Bb, nk)
    kend = torch.searchsorted(kp, qmax, right=True)
    kend = torch.where(_ascending(kp), kend, torch.full_like(kend, lk))
    qstart = torch.searchsorted(qp, kmin, right=False)
    qstart = torch.where(_ascending(qp), qstart, torch.zeros_like(qstart))
    return kend.to(torch.int32).contiguous(), qstart.to(torch.int32).contiguous()
