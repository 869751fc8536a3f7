"""Ring attention over a ``torch.distributed`` process group (context parallelism).

Every rank holds a shard of the queries, keys and values of one sequence, with their **global** positions. In the
forward the key/value shards travel around the ring (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``, the
transfer of the next shard overlapping the attention to the current one), each rank attends its queries to every
shard with the fused kernels (``return_lse=True``) and merges the partial results through their log-sum-exps.
Because positions are explicit kernel inputs, RoPE/HoPE/FoPE angles and ALiBi/TAPA distances ``|m - n|`` are
the global ones on every ring step; the causal rule ``k_pos <= q_pos`` masks by global position, so any layout
(contiguous, zigzag) works unchanged.

Backward: the shards travel the ring once more, each with the gradient accumulators of its keys and values; at
every step a rank recomputes its queries' partial attention to the shard with autograd and feeds it the share of
the gradient that the merge gives it (``d out / d o_j = w_j``, ``d out / d lse_j = w_j (o_j - out)``, ``w_j =
exp(lse_j - lse)``). That costs a forward and (for the lse's share) two backward passes per step where a direct
block backward with the global lse needs one backward pass; that one is left for later (not yet timed). After the last step one more hop brings every rank
the gradients of its own keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..attention import REQUIRED, _as_bool, merge_attention_partials, resolve_encoding
from ..encodings import Encoding
from .layout import LAYOUTS, shard_rows


class _Ring:
    """Point-to-point neighbours of this rank in ``group`` (``None``: the default group)."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = to_global((self.rank + 1) % self.world)
        self.prev = to_global((self.rank - 1) % self.world)

    def start(self, tensors):
        """Send ``tensors`` to the next rank and receive their like from the previous one, asynchronously:
        ``(received buffers, requests)``; :func:`_wait` the requests before reading the buffers."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


@dataclass
class _Config:
    ring: _Ring
    enc: Encoding
    causal: bool
    scale: Optional[float]
    backend: str


def _partial(q, k, v, q_pos, k_pos, cfg: _Config):
    from ..attention import fused_attention

    return fused_attention(q, k, v, cfg.enc, causal=cfg.causal, softmax_scale=cfg.scale, q_positions=q_pos,
                           k_positions=k_pos, backend=cfg.backend, return_lse=True)


class _RingAttention(torch.autograd.Function):
    """Inputs: this rank's q, k, v shards, their global positions, the config, the encoding's learnable tensors."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, cfg: _Config, *params):
        ring = cfg.ring
        cur = (k, v, k_pos)
        out = lse = None
        for step in range(ring.world):
            last = step + 1 == ring.world
            if not last:
                recv, reqs = ring.start(cur)  # the next shard travels while this one is attended to
            o, l = _partial(q, *cur[:2], q_pos, cur[2], cfg)
            wd = l.dtype
            out, lse = (o.to(wd), l) if out is None else merge_attention_partials([out, o.to(wd)], [lse, l])
            if not last:
                _wait(reqs)
                cur = tuple(recv)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, out, lse, *params)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, q_pos, k_pos, out, lse, *params = ctx.saved_tensors
        cfg = ctx.cfg
        ring = cfg.ring
        wd = lse.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(wd)
        lse_use = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros(q.shape, dtype=wd, device=q.device)
        dparams = [torch.zeros_like(p) for p in params]
        cur = (k, v, k_pos)
        acc = (torch.zeros(k.shape, dtype=wd, device=k.device), torch.zeros(v.shape, dtype=wd, device=v.device))
        for step in range(ring.world):
            last = step + 1 == ring.world
            if not last:
                recv_kv, reqs_kv = ring.start(cur)
            kk, vv, kp = cur
            with torch.enable_grad():
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, kk, vv))
                o, l = _partial(qg, kg, vg, q_pos, kp, cfg)
                w = torch.exp(l.to(wd) - lse_use)  # (B, H, Lq): this shard's weight in the merge (0 where l = -inf)
                g_o = w.transpose(1, 2)[..., None] * dout  # (B, Lq, H, Dv)
                g_l = w * (dout * (o.to(wd) - out)).sum(-1).transpose(1, 2)
                if dlse is not None:
                    g_l = g_l + w * dlse.to(wd)
                grads = torch.autograd.grad([o, l], [qg, kg, vg, *params], [g_o.to(o.dtype), g_l.to(l.dtype)],
                                            allow_unused=True)
            dq += grads[0].to(wd)
            acc = (acc[0] + grads[1].to(wd), acc[1] + grads[2].to(wd))
            for i, g in enumerate(grads[3:]):
                if g is not None:
                    dparams[i] += g
            # the shard's gradients follow it to the next rank; after the last step they reach its owner
            recv_g, reqs_g = ring.start(acc) if ring.world > 1 else (acc, [])
            _wait(reqs_g)
            acc = tuple(recv_g)
            if not last:
                _wait(reqs_kv)
                cur = tuple(recv_kv)
        return (dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None, *dparams)


def _global_positions(name: str, pos, seqlen_local: int, ring: _Ring, layout: str, offset: int, device):
    if pos is None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return offset + shard_rows(seqlen_local * ring.world, ring.rank, ring.world, layout, device)
    if not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of global positions or None")
    return pos


def _learnable_tensors(enc: Encoding) -> list:
    """The encoding's tensors that require grad (FoPE's coefficients, ALiBi's slopes), in a fixed order."""
    found = list(enc.parameters()) if isinstance(enc, torch.nn.Module) else []
    found += [t for _, t in sorted(vars(enc).items()) if isinstance(t, torch.Tensor)]
    seen, out = set(), []
    for t in found:
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, encoding: Union[str, Encoding] = REQUIRED, *,
                   causal: bool = False, softmax_scale: Optional[float] = None,
                   q_positions: Optional[torch.Tensor] = None, k_positions: Optional[torch.Tensor] = None,
                   layout: str = "contiguous", position_offset: int = 0, group=None, backend: str = "auto",
                   return_lse: bool = False):
    """Exact attention of this rank's query shard to the whole (sharded) sequence, forward and backward.

    Args:
        q: ``(batch, seqlen_q_local, nheads, headdim)``, this rank's queries; k, v: ``(batch, seqlen_k_local,
            nheads_kv, headdim[_v])``, this rank's keys and values. Every rank's k and v shards must have one
            shape (they travel the ring into buffers of that shape); q shards may differ.
        encoding, causal, softmax_scale, backend: as :func:`fused_posenc.fused_attention`, applied with global
            positions.
        q_positions, k_positions: the **global** positions of this rank's rows, ``(seqlen_local,)`` or ``(batch,
            seqlen_local)``. Default: ``position_offset + shard_rows(seqlen_local * world, rank, world, layout)``,
            the rows the :mod:`~fused_posenc.distributed.layout` gives this rank.
        layout: ``"contiguous"`` or ``"zigzag"`` (only used for the default positions).
        group: the process group of the context-parallel ranks (default: the whole world).
        return_lse: also return the rows' log-sum-exp ``(batch, nheads, seqlen_q_local)``.

    Returns:
        ``out (batch, seqlen_q_local, nheads, headdim_v)`` for this rank's queries (and ``lse``).

    Gradients: q, k, v get their full gradients on their own rank. The encoding's learnable tensors (FoPE
    coefficients, ALiBi slopes) get this rank's share; sum them over the group (as data parallelism does over
    its group: with DP x CP, all-reduce the parameters' gradients over both).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    ring = _Ring(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, seqlen_local, heads, headdim)")
    if isinstance(position_offset, bool) or not isinstance(position_offset, int):
        raise TypeError(f"position_offset must be an int, got {type(position_offset).__name__}")
    enc = resolve_encoding(encoding, q.shape[3], q.shape[2], q.device)
    causal = _as_bool("causal", causal)
    q_pos = _global_positions("q_positions", q_positions, q.shape[1], ring, layout, position_offset, q.device)
    k_pos = _global_positions("k_positions", k_positions, k.shape[1], ring, layout, position_offset, q.device)
    q_pos = (q_pos[None] if q_pos.dim() == 1 else q_pos).to(torch.int64)
    k_pos = (k_pos[None] if k_pos.dim() == 1 else k_pos).to(torch.int64).contiguous()
    cfg = _Config(ring, enc, causal, softmax_scale, backend)
    out, lse = _RingAttention.apply(q, k, v, q_pos, k_pos, cfg, *_learnable_tensors(enc))
    return (out, lse) if _as_bool("return_lse", return_lse) else out
