"""How a sequence is cut into context-parallel shards: which global rows each rank holds.

* ``"contiguous"``: rank ``r`` of ``W`` holds rows ``[r L/W, (r + 1) L/W)``.
* ``"zigzag"`` (load balance for causal attention): the sequence is cut into ``2W`` chunks and rank ``r`` holds
  chunks ``r`` and ``2W - 1 - r``, so every rank has as many early rows (few visible keys) as late ones (many).
"""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def shard_rows(seqlen: int, rank: int, world_size: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """``(seqlen // world_size,)`` int64: the global rows rank ``rank`` holds, ascending. ``seqlen`` must divide
    into ``world_size`` shards (``2 * world_size`` chunks for ``"zigzag"``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    chunks = world_size if layout == "contiguous" else 2 * world_size
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < chunks or seqlen % chunks:
        raise ValueError(f"seqlen ({seqlen}) must be a positive multiple of {chunks} for layout={layout!r} over "
                         f"{world_size} ranks")
    c = seqlen // chunks
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c, device=device)
    lo = torch.arange(rank * c, (rank + 1) * c, device=device)
    hi = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c, device=device)
    return torch.cat([lo, hi])


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The rows of ``x`` (along ``dim``, the sequence) that rank ``rank`` holds."""
    return x.index_select(dim, shard_rows(x.shape[dim], rank, world_size, layout, x.device))


def unshard(shards, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`shard`: every rank's shard (in rank order) back into the whole sequence."""
    shards = list(shards)
    w = len(shards)
    n = shards[0].shape[dim] * w
    rows = torch.cat([shard_rows(n, r, w, layout, shards[0].device) for r in range(w)])
    out = torch.cat(shards, dim)
    return out.index_select(dim, torch.argsort(rows))
