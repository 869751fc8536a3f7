"""Packed variable-length batches: :func:`fused_attention_varlen` (flash-attn's layout) and
:func:`cu_seqlens_from_position_ids`.

How it runs: the packed sequences are gathered into a padded batch ``(nseq, max_seqlen, heads, headdim)`` on the
device (no host read of ``cu_seqlens``), the batch runs through the backend with per-row key lengths (keys past a
sequence's end take no part) and the result is gathered back into the packed layout. The ``triton`` kernels skip
the padding keys' tiles and compute the padding query rows (discarded); the ``cpu`` backend runs each sequence on
its own rows and keys; the ``torch`` reference masks. The padding costs one copy of q, k, v and, on Triton, the
query rows ``nseq * max_seqlen_q - total_q``; a kernel that reads the packed layout directly is left for later.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .attention import REQUIRED, _as_bool, _check_tensor, _type_name, check_int_tensor, prepare
from .encodings import Encoding
from .encodings.angles import assert_values


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int, nseq: Optional[int], device) -> None:
    """Shape, dtype and device of a ``cu_seqlens``; its values (starts at 0, non-decreasing, ends at ``total``, no
    sequence longer than ``max_seqlen``) on the host for CPU tensors, by asynchronous device asserts on CUDA (no
    sync: a bad value fails the next synchronising call)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must have shape (num_sequences + 1,) with at least one sequence, "
                         f"got {tuple(cu.shape)}")
    if nseq is not None and cu.shape[0] != nseq + 1:
        raise ValueError(f"{name} has {cu.shape[0] - 1} sequences but cu_seqlens_q has {nseq}: they must match")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    lens = cu[1:] - cu[:-1]
    what = (f"{name} must start at 0, not decrease, end at the token count ({total}) and have no sequence longer "
            f"than max_seqlen ({max_seqlen})")

    def got():
        c = cu.tolist()
        return f"; got {c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}"

    assert_values((cu[0] == 0) & (cu[-1] == total) & (lens >= 0).all() & (lens <= max_seqlen).all(), what, got)


def _padded_index(cu: torch.Tensor, max_len: int):
    """``(src (nseq, max_len) int64, valid (nseq, max_len) bool, lengths (nseq,) int32)``: the packed row of each
    padded slot (padding slots repeat their sequence's last row, so positions gathered through it keep ascending)."""
    cu = cu.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    t = torch.arange(max_len, device=cu.device)
    valid = t[None, :] < lengths[:, None]
    last = (lengths - 1).clamp(min=0)
    src = cu[:-1, None] + torch.minimum(t[None, :], last[:, None])
    return src, valid, lengths.to(torch.int32)


def _pad(x: torch.Tensor, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed ``(total, ...)`` to padded ``(nseq, max_len, ...)``, zeros in the padding (which gets no gradient)."""
    g = x[src.clamp(max=x.shape[0] - 1)]
    return torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 1))), g, torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device))


def _token_index(cu: torch.Tensor, total: int):
    """``(seq, t)`` of every packed token: its sequence and its row in it."""
    tok = torch.arange(total, device=cu.device)
    cu = cu.to(torch.int64)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    return seq, tok - cu[seq]


def _positions_packed(name: str, pos, total: int, device) -> torch.Tensor:
    check_int_tensor(name, pos, device)
    if pos.shape != (total,):
        raise ValueError(f"{name} must have shape ({total},) (one position per packed token), got {tuple(pos.shape)}")
    return pos.to(torch.int64)


def fused_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           encoding: Union[str, Encoding] = REQUIRED, *, causal: bool = False,
                           softmax_scale: Optional[float] = None, q_positions: Optional[torch.Tensor] = None,
                           k_positions: Optional[torch.Tensor] = None, return_lse: bool = False,
                           backend: str = "auto", window_size=(-1, -1), softcap: Optional[float] = None):
    """Attention over packed sequences of different lengths (flash-attn's ``flash_attn_varlen_func`` layout): no
    query attends to a key of another sequence.

    Args:
        q: ``(total_q, nheads, headdim)``, the sequences' queries concatenated.
        k: ``(total_k, nheads_kv, headdim)``; v: ``(total_k, nheads_kv, headdim_v)``; ``nheads % nheads_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(num_sequences + 1,)`` int32 on q's device, the cumulative lengths
            (``0, len_0, len_0 + len_1, ..., total``); sequence ``i`` is rows ``cu[i]:cu[i + 1]``. Lengths may be 0.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest query / key sequence (checked).
        encoding, causal, softmax_scale, backend, window_size, softcap: as :func:`fused_attention` (the window is
            on positions, so it restarts with them in every sequence).
        q_positions, k_positions: one integer position per packed token, ``(total_q,)`` / ``(total_k,)``.
            Default: positions restart at 0 in every sequence, keys ``0 .. Lk_i - 1`` and queries
            ``Lk_i - Lq_i .. Lk_i - 1`` (bottom-right aligned, as :func:`fused_attention`'s defaults).
        return_lse: also return the rows' log-sum-exp.

    Returns:
        ``out (total_q, nheads, headdim_v)`` in q's dtype; with ``return_lse``, ``(out, lse)``, ``lse (nheads,
        total_q)`` float32 (float64 for float64 inputs), natural log, ``-inf`` for rows that see no key (flash-attn's
        varlen layout). Differentiable w.r.t. q, k, v and the encoding's parameters.
    """
    from .backends import select_backend

    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, "total_tokens, heads, headdim")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have k's token count ({k.shape[0]}), got {v.shape[0]}")
    max_seqlen_q = _check_int("max_seqlen_q", max_seqlen_q, 1)
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k, 1)
    total_q, total_k = q.shape[0], k.shape[0]
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, None, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, cu_seqlens_q.shape[0] - 1, q.device)
    causal = _as_bool("causal", causal)
    return_lse = _as_bool("return_lse", return_lse)

    src_q, valid_q, len_q = _padded_index(cu_seqlens_q, max_seqlen_q)
    src_k, valid_k, len_k = _padded_index(cu_seqlens_k, max_seqlen_k)
    qp, kp, vp = _pad(q, src_q, valid_q), _pad(k, src_k, valid_k), _pad(v, src_k, valid_k)
    if q_positions is None:  # restart per sequence, bottom-right aligned
        q_pos = (len_k - len_q).to(torch.int64)[:, None] + torch.arange(max_seqlen_q, device=q.device)[None]
    else:
        q_pos = _positions_packed("q_positions", q_positions, total_q, q.device)[src_q]
    if k_positions is None:
        k_pos = torch.arange(max_seqlen_k, device=q.device)[None]
    else:
        k_pos = _positions_packed("k_positions", k_positions, total_k, q.device)[src_k]
    p = prepare(qp, kp, vp, encoding, causal, softmax_scale, q_pos, k_pos, window_size, softcap)
    p = dataclasses.replace(p, k_lengths=len_k, q_lengths=len_q, return_lse=return_lse)
    res = select_backend(backend, p).run(p)
    out_p, lse_p = res if return_lse else (res, None)
    seq, t = _token_index(cu_seqlens_q, total_q)
    out = out_p[seq, t]  # (total_q, H, Dv)
    if not return_lse:
        return out
    return out, lse_p[seq, :, t].transpose(0, 1)  # (H, total_q)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor):
    """``(cu_seqlens int32 (num_sequences + 1,), max_seqlen int)`` of a packed row whose positions restart at 0 at
    every document (Hugging Face's ``position_ids`` for packed batches).

    ``position_ids``: ``(total,)`` or ``(1, total)`` integers, the first one 0. A document starts at every 0. The
    result has a data-dependent size and ``max_seqlen`` is a Python int, so this reads the device once (a sync):
    call it in the data pipeline, not inside a compiled step.
    """
    pos = check_int_tensor("position_ids", position_ids, getattr(position_ids, "device", None))
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    if pos.dim() != 1 or pos.numel() == 0:
        raise ValueError(f"position_ids must have shape (total,) or (1, total), got {tuple(position_ids.shape)}")
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids must start at 0 (every document starts at position 0)")
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


__all__ = ["fused_attention_varlen", "cu_seqlens_from_position_ids", "check_cu_seqlens"]
