"""Autograd layer of the Triton backend and its public entry point ``triton_attention``."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ...encodings.base import encoding_by_id
from ..autograd_util import PerEncodingCache, single_backward
from ..native import lse_grad_pass
from .bounds import tile_bounds
from .bwd import attn_bwd
from .fwd import attn_fwd
from .plan import ENC_CODES, Plan, interpreter, make_plan, traced
from .rotate import rope_tables, rotate_tensor

_PLANS = PerEncodingCache()


# The launches as torch.library ops: Triton ops on a GPU (torch.compile traces through them to the kernels, which
# Inductor compiles into its graph), custom ops under the interpreter (one opaque node each, shapes from the fake
# implementations). The plan (kernel parameters, cached per encoding) is built inside, found by the encoding's id.
# Empty tensors stand for "none" (FoPE tables of other encodings, gradients not wanted).
def _opt(t):
    return None if t.numel() == 0 else t


def _plan_of(enc_id: int, q, k, scale: float, fope_learnable: bool, slopes) -> Plan:
    """The call's plan; ``slopes``: caller-given ALiBi slopes ``(Bs, H)`` float32, read by the kernels from the op's
    input (so a compiled graph sees their current values, never a copy taken when it was traced), or empty."""
    b, _, h, d = q.shape
    enc = encoding_by_id(enc_id)
    plan = (_traced_plan if traced(q) else _cached_plan)(enc, d, h, k.shape[2], b, q.device, scale)
    if plan.enc == ENC_CODES["fope"]:
        plan = Plan(**{**plan.__dict__, "fope_learnable": fope_learnable})
    if plan.enc == ENC_CODES["alibi"] and slopes.numel():
        stride_b = slopes.shape[1] if slopes.shape[0] > 1 else 0
        plan = Plan(**{**plan.__dict__, "slopes": slopes, "slope_stride_b": stride_b})
    return plan


def _traced_plan(enc, d, h, hkv, b, device, scale) -> Plan:
    """The plan of a call torch.compile traces: the cached plan, built for real outside the trace, with its tensors
    entering the graph as constants (``lift_fresh_copy`` of the real device tensors: no host-to-device copy per call)
    and no table cache (RoPE tables are built in the graph)."""
    with _disable_current_modes():  # no tracing mode sees the plan's construction
        plan = _cached_plan(enc, d, h, hkv, b, device, scale)
    fields = {name: torch.ops.aten.lift_fresh_copy.default(v) if isinstance(v, torch.Tensor) else v
              for name, v in plan.__dict__.items()}
    return Plan(**{**fields, "tables": {}})


def _forward_fake(q, k, v, tcq, tsq, tck, tsk, q_pos, k_pos, k_lengths, slopes, enc_id, scale, causal, default_pos,
                  fope_learnable, num_splits=1, k_left=False, window_left=-1, window_right=-1, softcap=0.0):
    b, lq, h, _ = q.shape
    return q.new_empty(b, lq, h, v.shape[3]), q.new_empty(b, h, lq, dtype=torch.float32)


def _backward_fake(do, q, k, v, out, lse, tcq, tsq, tck, tsk, q_pos, k_pos, k_lengths, slopes, enc_id, scale, causal,
                   default_pos, fope_learnable, slope_grad, k_left=False, window_left=-1, window_right=-1, softcap=0.0):
    tabs = fope_learnable and tcq.numel() > 0
    tab_grads = [q.new_empty(t.shape if tabs else (0,), dtype=torch.float32) for t in (tcq, tsq, tck, tsk)]
    dslopes = q.new_empty((q.shape[0], q.shape[2]) if slope_grad else (0,), dtype=torch.float32)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *tab_grads, dslopes]


def _launch_op(name: str, fake):
    """Register a launcher as the custom op ``name``: a ``torch.library.triton_op`` on a GPU, so that torch.compile
    traces into it and the Triton kernels become graph nodes that Inductor compiles and schedules (the function,
    run on fake tensors, is its own fake implementation); under the interpreter, whose kernels cannot run on fake
    tensors, a ``custom_op`` (one opaque graph node) with the fake implementation ``fake``."""

    def register(fn):
        if interpreter():
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)

    return register


@_launch_op("fused_posenc::triton_forward", _forward_fake)
def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tcq: torch.Tensor, tsq: torch.Tensor,
                   tck: torch.Tensor, tsk: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   k_lengths: torch.Tensor, slopes: torch.Tensor, enc_id: int, scale: float, causal: bool,
                   default_pos: bool,
                   fope_learnable: bool, num_splits: int = 1, k_left: bool = False, window_left: int = -1,
                   window_right: int = -1, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, Lq, H, Dv)`` in q's dtype, ``lse (B, H, Lq)`` float32 (log2 domain). FoPE tables ``(Bt, rows, Ht,
    P)`` float32 for the query and key rows, or empty tensors; ``k_lengths (B,)`` int32 (key padding; ``k_left``:
    they count the last keys) or empty; ``slopes (Bs, H)`` float32, caller-given ALiBi slopes, or empty;
    ``num_splits``: key ranges run by separate programs and merged (flash-decoding); the window's sides (-1:
    unbounded, both: no window) and the softcap (0: none)."""
    plan = _plan_of(enc_id, q, k, scale, fope_learnable, slopes)
    q_tab, k_tab = _rotation_tables(plan, tcq, tsq, tck, tsk, q_pos, k_pos, default_pos)
    k_arg = rotate_tensor(k, plan, plan.k_heads_rot, k_tab, nheads=q.shape[2]) if plan.rotation else k
    window, cap = _mask(window_left, window_right, softcap)
    bounds = _bounds(q_pos, k_pos, causal, window, default_pos)
    return attn_fwd(q, k_arg, v, q_pos, k_pos, plan, causal, default_pos, q_tables=q_tab,
                    bounds=bounds, k_lengths=_opt(k_lengths), num_splits=num_splits, k_left=k_left, window=window,
                    softcap=cap)


def _rotation_tables(plan: Plan, tcq, tsq, tck, tsk, q_pos, k_pos, default_pos: bool):
    """The ``(cos, sin)`` tables of the query and the key rows: FoPE's (op inputs), RoPE/HoPE's (built here by
    ``rotate.rope_tables``; for default positions once per length and kept on the plan), or ``(None, None)``."""
    if plan.enc != 1:
        return (None if _opt(tcq) is None else (tcq, tsq)), (None if _opt(tck) is None else (tck, tsk))
    if not default_pos:
        return rope_tables(plan, q_pos), rope_tables(plan, k_pos)
    lq, lk = q_pos.shape[1], k_pos.shape[1]
    return _default_tables(plan, lk - lq, q_pos), _default_tables(plan, 0, k_pos)


def _default_tables(plan: Plan, start: int, pos):
    """RoPE/HoPE tables of the default positions ``start .. start + rows - 1`` (``pos`` holds them), cached on the
    plan (at most 8 lengths)."""
    key = (start, pos.shape[1])
    tabs = plan.tables.get(key)
    if tabs is None:
        if len(plan.tables) >= 8:
            plan.tables.pop(next(iter(plan.tables)))
        tabs = plan.tables[key] = rope_tables(plan, pos)
    return tabs


def _mask(window_left: int, window_right: int, softcap: float):
    """The custom ops' scalars back to ``Problem``'s ``window`` and ``softcap``."""
    window = None if window_left < 0 and window_right < 0 else (window_left, window_right)
    return window, (softcap if softcap > 0 else None)


def _bounds(q_pos, k_pos, causal: bool, window, default_pos: bool):
    """Tile ranges for caller-given positions under the causal rule or a window (``bounds.py``), else ``None``."""
    return tile_bounds(q_pos, k_pos, causal, window) if (causal or window is not None) and not default_pos else None


@_launch_op("fused_posenc::triton_backward", _backward_fake)
def triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, tcq: torch.Tensor, tsq: torch.Tensor, tck: torch.Tensor, tsk: torch.Tensor,
                    q_pos: torch.Tensor, k_pos: torch.Tensor, k_lengths: torch.Tensor, slopes: torch.Tensor,
                    enc_id: int, scale: float,
                    causal: bool, default_pos: bool, fope_learnable: bool, slope_grad: bool, k_left: bool = False,
                    window_left: int = -1, window_right: int = -1, softcap: float = 0.0) -> list[torch.Tensor]:
    """``[dq, dk, dv, dtcq, dtsq, dtck, dtsk, dslopes]``: the table gradients in the tables' shapes (learnable
    FoPE), ``dslopes (B, H)`` float32 (``slope_grad``), else empty tensors."""
    plan = _plan_of(enc_id, q, k, scale, fope_learnable, slopes)
    q_tab, k_tab = _rotation_tables(plan, tcq, tsq, tck, tsk, q_pos, k_pos, default_pos)
    q_rot = k_rot = None
    if plan.rotation:
        q_rot = rotate_tensor(q, plan, q.shape[2], q_tab)
        k_rot = rotate_tensor(k, plan, plan.k_heads_rot, k_tab, nheads=q.shape[2])
    window, cap = _mask(window_left, window_right, softcap)
    bounds = _bounds(q_pos, k_pos, causal, window, default_pos)
    dq, dk, dv, tabs, dslopes = attn_bwd(do, q, k, v, out, lse, q_pos, k_pos, plan, causal, default_pos,
                                         q_rot=q_rot, k_rot=k_rot, q_tables=q_tab,
                                         k_tables=k_tab, slope_grad=slope_grad, bounds=bounds,
                                         k_lengths=_opt(k_lengths), k_left=k_left, window=window, softcap=cap)
    tab_grads = [q.new_empty(0, dtype=torch.float32) for _ in range(4)]
    if tabs is not None:  # per-row, per-query-head table gradients -> the tables' own shapes
        tab_grads = [_reduce_table_grad(g, t) for g, t in zip(tabs, (tcq, tsq, tck, tsk))]
    return [dq, dk, dv, *tab_grads, q.new_empty(0, dtype=torch.float32) if dslopes is None else dslopes]


class TritonAttention(torch.autograd.Function):
    """Inputs: q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv); FoPE tables ``(Bt, rows, Ht, P)``
    float32 for the query and key rows (empty tensors for other encodings); caller-given ALiBi slopes ``(Bs, H)``
    float32 (the kernels read them; their gradient is returned when they require grad), else an empty tensor;
    positions (Bp, L) int64; key lengths (B,) int32 or an empty tensor; the encoding, the score scale, causal,
    default positions, FoPE learnable, return the lse, the key splits of the forward (flash-decoding), and the
    masking scalars ``(k_left, window_left, window_right, softcap)`` of the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, tcq, tsq, tck, tsk, slopes, q_pos, k_pos, k_lengths, enc, scale, causal, default_pos,
                fope_learnable, return_lse, num_splits=1, masking=(False, -1, -1, 0.0)):
        out, lse = triton_forward(q, k, v, tcq, tsq, tck, tsk, q_pos, k_pos, k_lengths, slopes, id(enc), scale,
                                  causal, default_pos, fope_learnable, num_splits, *masking)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, k_lengths, tcq, tsq, tck, tsk, slopes)
        ctx.slopes_batch = slopes.shape[0] if slopes.numel() else None
        ctx.enc = enc  # alive until the backward
        ctx.args = (scale, causal, default_pos, fope_learnable)
        ctx.masking = masking
        if not return_lse:
            return out
        ctx.set_materialize_grads(False)
        # the kernels' lse is log2 and +inf for rows that see no key; the public one is natural and -inf there
        return out, torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse * math.log(2.0))

    @staticmethod
    @single_backward
    def backward(ctx, do, dlse=None):
        q, k, v, out, lse, q_pos, k_pos, k_lengths, tcq, tsq, tck, tsk, slopes = ctx.saved_tensors
        slope_grad = ctx.slopes_batch is not None and ctx.needs_input_grad[7]

        def run(do, v, out):
            return triton_backward(do, q, k, v, out, lse, tcq, tsq, tck, tsk, q_pos, k_pos, k_lengths, slopes,
                                   id(ctx.enc), *ctx.args, slope_grad, *ctx.masking)

        parts, dv = [], None
        if do is not None:
            parts.append(run(do.contiguous(), v, out))
            dv = parts[0][2]
        if dlse is not None:  # the lse's share: ops/native.py lse_grad_pass
            parts.append(lse_grad_pass(run, q, v, dlse, upstream_dtype=q.dtype))
        dq, dk, _, *tabs, dslopes = (x[0] if len(x) == 1 else x[0] + x[1] for x in zip(*parts))
        if slope_grad and ctx.slopes_batch == 1:  # (B, H) -> the slopes' (1, H)
            dslopes = dslopes.sum(0, keepdim=True)
        grads = [g if ctx.needs_input_grad[3 + i] and g.numel() else None for i, g in enumerate(tabs)]
        return (dq, dk, dv, *grads, dslopes if slope_grad else None, *([None] * 11))


def _reduce_table_grad(g, table):
    """(B, rows, H, P) -> table's (Bt, rows, Ht, P): sum over the query heads sharing a table head, and
    over the batch when the table is shared."""
    b, rows, h, p = g.shape
    ht = table.shape[2]
    g = g.view(b, rows, ht, h // ht, p).sum(3)
    return g.sum(0, keepdim=True) if table.shape[0] == 1 and b > 1 else g


def fope_tables(enc, pos: torch.Tensor):
    """FoPE ``(C, S)`` for rows at ``pos (Bp, L)``: ``(Bp, L, Hc, P)`` float32, contiguous, differentiable
    w.r.t. the coefficients. Exact angles (``encodings/angles.py``); the Fourier sums in float64 (a TF32
    matmul would cost ~1e-3 of relative accuracy), then rounded to float32. The kernels map query head
    ``h`` to table head ``h // (nheads // Hc)``."""
    c, s = enc.fourier_tables(pos, enc.cos_coef, enc.sin_coef, torch.float32, sum_dtype=torch.float64)
    return c.contiguous(), s.contiguous()


def _cached_plan(enc, d, h, hkv, b, device, scale) -> Plan:
    """The plan of (encoding, shape, device), cached per encoding object (``PerEncodingCache``)."""
    return _PLANS.get(enc, (d, h, hkv, b, str(device), scale), lambda: make_plan(
        enc.kernel_params(d, h, hkv, b, device), d, h, hkv, scale, device, fope_heads=getattr(enc, "num_heads", 1)))


def triton_attention(p, num_splits: int = 1) -> torch.Tensor:
    """Run a validated :class:`~fused_posenc.attention.Problem` through the Triton kernels (``num_splits``: key
    ranges of the forward, flash-decoding; the inference-only KV-cache call sets it)."""
    enc = p.encoding
    b, lq, lk, h, hkv, d, dv = p.shape
    scale = enc.score_scale(d, p.softmax_scale)
    tables = [torch.empty(0, device=p.q.device) for _ in range(4)]  # distinct: apply takes no duplicate inputs
    given = enc.name == "alibi" and getattr(enc, "_slopes", None) is not None  # caller-given slopes: an input
    slopes = enc.slopes(h, b, p.q.device).contiguous() if given else torch.empty(0, device=p.q.device)
    learnable = False
    if enc.name == "fope":
        learnable = enc.learnable and torch.is_grad_enabled()
        tables = [*fope_tables(enc, p.q_pos), *fope_tables(enc, p.k_pos)]
    q_pos, k_pos = p.q_pos.contiguous(), p.k_pos.contiguous()
    if k_pos is q_pos:
        k_pos = k_pos.clone()
    k_lengths = torch.empty(0, device=p.q.device, dtype=torch.int32) if p.k_lengths is None else p.k_lengths
    left, right = p.window if p.window is not None else (-1, -1)
    masking = (p.k_padding_left, left, right, p.softcap or 0.0)
    return TritonAttention.apply(p.q, p.k, p.v, *tables, slopes, q_pos, k_pos, k_lengths, enc, scale, p.causal,
                                 p.default_positions, learnable, p.return_lse, num_splits, masking)
