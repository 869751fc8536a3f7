"""KV-cache decoding: :func:`fused_attention_with_kvcache` (flash-attn's ``flash_attn_with_kvcache`` conventions).

The cache holds **raw keys** (not yet encoded): the kernels encode each key from its position on every call, as they
do for :func:`fused_attention`. Why: it is the only layout that serves every encoding (ALiBi and TAPA have no
"encoded key", FoPE's keys depend on coefficients a fine-tune may change), positions stay exact integers, and the
RoPE scaling can change at inference time without re-encoding the cache. The cost is the keys' rotation per step
(RoPE/HoPE/FoPE): ``benchmarks/bench_decode.py`` measures it against "rotate the new key + SDPA over an encoded
cache" (README, "Decoding with a KV cache").

On the ``triton`` backend the keys are split into ranges run by separate programs when there are few query rows
(flash-decoding: one (query block, head) alone would leave most of the GPU idle), and the partial results are
merged through their log-sum-exps. ``cpu`` runs each batch row on its cache prefix; ``torch`` masks; ``cuda``
refuses (its kernels take no key lengths).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .attention import REQUIRED, _as_bool, _type_name, check_int_tensor, prepare
from .encodings import Encoding
from .encodings.angles import assert_values


def _cache_lengths(cache_seqlens, batch: int, device) -> torch.Tensor:
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an integer tensor (batch,), got bool")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an integer tensor (batch,), got {_type_name(cache_seqlens)}")
    check_int_tensor("cache_seqlens", cache_seqlens, device)
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), got {tuple(cache_seqlens.shape)}")
    return cache_seqlens.to(torch.int32)


def _check_cache(name: str, t, batch: int, device, dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[0] != batch or t.shape[1] == 0:
        raise ValueError(f"{name} must be (batch={batch}, cache_len >= 1, nheads_kv, headdim), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have q's dtype {dtype}, got {t.dtype}")


def default_num_splits(batch: int, nheads: int, seqlen_q: int, cache_len: int, device) -> int:
    """Key ranges for the Triton forward: enough programs for about two waves of the GPU's multiprocessors (4 on
    the CPU interpreter), each range at least 256 keys, at most 64 ranges; 1 when the query rows alone fill it."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    programs = batch * nheads * max(1, -(-seqlen_q // 64))
    want = -(-2 * sms // programs)
    return max(1, min(want, -(-cache_len // 256), 64))


def fused_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens,
                                 k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                                 encoding: Union[str, Encoding] = REQUIRED, *, causal: bool = True,
                                 softmax_scale: Optional[float] = None, q_positions: Optional[torch.Tensor] = None,
                                 k_positions: Optional[torch.Tensor] = None, return_lse: bool = False,
                                 num_splits: int = 0, backend: str = "auto", window_size=(-1, -1),
                                 softcap: Optional[float] = None):
    """Attention of new queries to a KV cache, after writing the new keys and values into it (inference only).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, the new tokens' queries.
        k_cache: ``(batch, cache_len, nheads_kv, headdim)``, raw (unencoded) keys; v_cache: ``(batch, cache_len,
            nheads_kv, headdim_v)``. Rows past a batch row's length are ignored (any values).
        cache_seqlens: int or ``(batch,)`` integer tensor on q's device: the tokens already in each row's cache.
        k, v: optional ``(batch, seqlen_new, nheads_kv, headdim[_v])``: written **in place** into ``k_cache`` /
            ``v_cache`` at rows ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` before the attention
            (``cache_seqlens`` itself is not changed: the caller advances it). ``cache_seqlens + seqlen_new`` must
            not exceed ``cache_len`` (checked: on the host for CPU tensors, by a device assert on CUDA).
        encoding, softmax_scale, backend, window_size, softcap: as :func:`fused_attention` (a window
            ``(left, -1)`` keeps the last ``left + 1`` positions, as a sliding-window model decodes).
        causal: key ``n`` visible to query ``m`` iff ``k_pos[n] <= q_pos[m]`` (default True). Without it, every
            key of the row's valid prefix is visible.
        q_positions, k_positions: as :func:`fused_attention`; defaults: the key in cache row ``n`` is at position
            ``n``; with ``L_b = cache_seqlens[b] + seqlen_new`` valid keys, query ``t`` is at ``L_b - seqlen_q + t``
            (bottom-right aligned: the new tokens are the last ones).
        num_splits: key ranges of the Triton forward (flash-decoding); 0 chooses (``default_num_splits``), 1 turns
            splitting off. Ignored by the other backends.
        return_lse: also return the rows' log-sum-exp ``(batch, nheads, seqlen_q)``.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` (and ``lse``). No gradients: inputs that require grad while
        grad mode is on raise (use :func:`fused_attention` for training).
    """
    from .backends import select_backend

    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-dim tensor (batch, seqlen_q, nheads, headdim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    b = q.shape[0]
    _check_cache("k_cache", k_cache, b, q.device, q.dtype)
    _check_cache("v_cache", v_cache, b, q.device, q.dtype)
    if v_cache.shape[1] != k_cache.shape[1] or v_cache.shape[2] != k_cache.shape[2]:
        raise ValueError(f"v_cache must have k_cache's length and heads {tuple(k_cache.shape[1:3])}, "
                         f"got {tuple(v_cache.shape[1:3])}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    tensors = [q, k_cache, v_cache] + ([k, v] if k is not None else [])
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise ValueError("fused_attention_with_kvcache is for inference and has no backward: call it under "
                         "torch.no_grad() or torch.inference_mode() (fused_attention trains)")
    num_splits = _check_splits(num_splits)
    cache_len = k_cache.shape[1]
    lens = _cache_lengths(cache_seqlens, b, q.device)
    new = 0
    if k is not None:
        for name, t, ref in (("k", k, k_cache), ("v", v, v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != b or t.shape[2:] != ref.shape[2:]:
                raise ValueError(f"{name} must have shape (batch={b}, seqlen_new, {ref.shape[2]}, {ref.shape[3]}), "
                                 f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{name} must have the cache's dtype and device ({ref.dtype}, {ref.device}), "
                                 f"got {t.dtype}, {t.device}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"k and v must have one seqlen_new, got {k.shape[1]} and {v.shape[1]}")
        new = k.shape[1]
    _check_capacity(lens, new, cache_len)
    valid = (lens + new).to(torch.int32)  # (B,) keys each row attends to
    lq = q.shape[1]
    if q_positions is None:
        q_positions = (valid.to(torch.int64) - lq)[:, None] + torch.arange(lq, device=q.device)[None]
    # every argument checked before the cache is written: a refused call leaves it as it was
    p = prepare(q, k_cache, v_cache, encoding, causal, softmax_scale, q_positions, k_positions, window_size, softcap)
    if new:  # the write, in place: rows lens[b] .. lens[b] + new - 1
        rows = lens.to(torch.int64)[:, None] + torch.arange(new, device=q.device)[None]  # (B, new)
        bidx = torch.arange(b, device=q.device)[:, None].expand(b, new)
        k_cache.index_put_((bidx, rows), k)
        v_cache.index_put_((bidx, rows), v)
    if num_splits == 0:
        num_splits = default_num_splits(b, q.shape[2], lq, cache_len, q.device)
    p = dataclasses.replace(p, k_lengths=valid, default_positions=False, num_splits=num_splits,
                            return_lse=_as_bool("return_lse", return_lse))
    return select_backend(backend, p).run(p)


def _check_splits(num_splits) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {_type_name(num_splits)}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: chosen per call), got {num_splits}")
    return num_splits


def _check_capacity(lens: torch.Tensor, new: int, cache_len: int) -> None:
    what = f"cache_seqlens + seqlen_new ({new}) must lie in [0, cache_len={cache_len}]"
    assert_values(((lens >= 0) & (lens + new <= cache_len)).all(), what,
                  lambda: f"; cache_seqlens ranges over [{int(lens.min())}, {int(lens.max())}] (the cache is too small)")


__all__ = ["fused_attention_with_kvcache", "default_num_splits"]
