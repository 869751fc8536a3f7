"""Tile bounds for caller-given positions under the causal rule and a sliding window, computed on the device
(no host sync).

With default positions the visible keys of a query block follow from the block index and the kernels derive their
loop bounds themselves. With caller-given positions (Hugging Face models always pass ``position_ids``) they cannot,
so this pre-pass summarises the positions in chunks of ``CHUNK`` rows (every block size is a multiple of it). Key
``n`` is visible to query ``m`` iff ``q_pos[m] - left <= k_pos[n] <= q_pos[m] + right``, where the causal rule is
``right = 0`` and an unbounded side is ``None``:

* ``krange[b, :, c] = (begin, end)``: the keys a query chunk ``c`` can see lie in ``[begin, end)`` when the row's key
  positions ascend (``searchsorted`` of the chunk's smallest query position minus ``left`` and of its largest plus
  ``right``); ``(0, Lk)`` otherwise.
* ``qrange[b, :, c] = (begin, end)``: the queries that can see key chunk ``c`` lie in ``[begin, end)`` when the row's
  query positions ascend; ``(0, Lq)`` otherwise.
* ``krange[b, 2:, c]`` and ``qrange[b, 2:, c]``: the keys that every query of chunk ``c`` sees (``[qmax - left, qmin
  + right]`` in positions), and the queries that see every key of chunk ``c``; empty (``(L, 0)``) when the
  positions do not ascend. Tiles inside the intersection of a block's chunks run without a mask (``hooks.
  stage_tiles``).

The forward and dq kernels loop over the union of their chunks' key ranges, the dk/dv kernel over the union of its
query ranges; the per-element mask stays, so the bounds only skip tiles that would be all masked, and a row order
that does not ascend merely skips nothing.
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


def _unsorted(device, n: int) -> torch.Tensor:
    """``(1, 4, 1)`` ranges of rows that do not ascend: all ``n`` rows visible, none fully, ``(0, n, n, 0)``. Built on
    the device (a list through ``torch.tensor(..., device=)`` is a pageable host-to-device copy, which synchronises)."""
    row = torch.arange(4, device=device).view(1, 4, 1)
    return torch.where((row == 1) | (row == 2), n, 0)


def window_sides(causal: bool, window):
    """``(left, right)`` of the visibility rule (``None``: unbounded), the causal rule folded in as ``right = 0``."""
    left, right = window if window is not None else (-1, -1)
    left = None if left < 0 else left
    right = 0 if causal else (None if right < 0 else right)
    return left, right


def tile_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window=None):
    """``(krange (Bb, 4, ceil(Lq/16)), qrange (Bb, 4, ceil(Lk/16)))`` int32 for ``q_pos (Bq, Lq)``, ``k_pos (Bk, Lk)``
    int64, ``Bb = max(Bq, Bk)``, under ``causal`` and ``window`` ``(left, right)`` (-1: unbounded) or ``None``; see
    the module docstring."""
    left, right = window_sides(causal, window)
    bb = max(q_pos.shape[0], k_pos.shape[0])
    qp = q_pos.expand(bb, -1).contiguous()
    kp = k_pos.expand(bb, -1).contiguous()
    lq, lk = qp.shape[1], kp.shape[1]
    qmin, qmax = _chunked(qp, _I64_MAX, "min"), _chunked(qp, _I64_MIN, "max")  # (Bb, nq)
    kmin, kmax = _chunked(kp, _I64_MAX, "min"), _chunked(kp, _I64_MIN, "max")  # (Bb, nk)

    def first(sorted_pos, bound, size):  # index of the first position >= bound; 0 when unbounded
        return torch.zeros_like(bound) if size is None else torch.searchsorted(sorted_pos, bound - size)

    def end(sorted_pos, bound, size, n):  # index past the last position <= bound; n when unbounded
        if size is None:
            return torch.full_like(bound, n)
        return torch.searchsorted(sorted_pos, bound + size, right=True)

    # the keys every query of a chunk sees: k_pos in [qmax - left, qmin + right]; the queries that see every key of
    # a chunk: q_pos in [kmax - right, kmin + left]
    krange = torch.stack([first(kp, qmin, left), end(kp, qmax, right, lk),
                          first(kp, qmax, left), end(kp, qmin, right, lk)], 1)  # (Bb, 4, nq)
    krange = torch.where(_ascending(kp)[:, :, None], krange, _unsorted(kp.device, lk))
    qrange = torch.stack([first(qp, kmin, right), end(qp, kmax, left, lq),
                          first(qp, kmax, right), end(qp, kmin, left, lq)], 1)  # (Bb, 4, nk)
    qrange = torch.where(_ascending(qp)[:, :, None], qrange, _unsorted(qp.device, lq))
    return krange.to(torch.int32).contiguous(), qrange.to(torch.int32).contiguous()
