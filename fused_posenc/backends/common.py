"""Checks several backends share."""
from __future__ import annotations

import torch


def learnable_slopes(problem) -> bool:
    """Whether the call must return a gradient for caller-given ALiBi slopes."""
    s = getattr(problem.encoding, "_slopes", None)
    return problem.encoding.name == "alibi" and s is not None and s.requires_grad and torch.is_grad_enabled()


def batch_specific_encoding(problem) -> bool:
    """Whether the encoding holds per-batch-row parameters (ALiBi slopes ``(batch, H)``)."""
    s = getattr(problem.encoding, "_slopes", None)
    return problem.encoding.name == "alibi" and s is not None and s.dim() == 2 and s.shape[0] > 1


def run_by_rows(p, run):
    """Key padding by slicing, for backends whose kernels take none: batch row ``b`` of ``p`` (a
    :class:`~fused_posenc.attention.Problem` with ``k_lengths`` on the CPU, so reading them costs no device sync)
    runs alone on its first ``k_lengths[b]`` keys (its last ones with ``k_padding_left``) and its first
    ``q_lengths[b]`` queries, when given (the padding rows output zeros) through ``run(problem) -> out | (out, lse)``; a row with no key outputs zeros (and lse
    -inf). Differentiable (slices and concatenations)."""
    import dataclasses

    b, lq, lk, h, hkv, d, dv = p.shape
    k_len = p.k_lengths.tolist()
    q_len = p.q_lengths.tolist() if p.q_lengths is not None else [lq] * b
    wd = torch.float64 if p.q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for i, (m, n) in enumerate(zip(q_len, k_len)):
        out = p.q.new_zeros(1, m, h, dv)
        lse = torch.full((1, h, m), float("-inf"), dtype=wd)
        if n > 0 and m > 0:
            keys = slice(lk - n, lk) if p.k_padding_left else slice(0, n)
            row = dataclasses.replace(
                p, q=p.q[i:i + 1, :m], k=p.k[i:i + 1, keys], v=p.v[i:i + 1, keys], k_lengths=None, q_lengths=None,
                k_padding_left=False, default_positions=False, q_pos=p.q_pos[min(i, p.q_pos.shape[0] - 1), :m][None],
                k_pos=p.k_pos[min(i, p.k_pos.shape[0] - 1), keys][None])
            res = run(row)
            out, lse = res if p.return_lse else (res, lse)
        if m < lq:  # padding rows
            out = torch.cat([out, out.new_zeros(1, lq - m, h, dv)], 1)
            lse = torch.cat([lse, lse.new_full((1, h, lq - m), float("-inf"))], 2)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 0)
    return (out, torch.cat(lses, 0)) if p.return_lse else out
