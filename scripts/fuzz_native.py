#!/usr/bin/env python
"""Seeded random fuzz of the C++ CPU backend (``fused_posenc._C``) against the float64 reference.

Each case draws a shape (batch 1-3, seqlens 1-130 with Lq != Lk, GQA head ratios, head dims including odd
ones where the encoding allows them, headdim_v != headdim), a dtype (fp32/fp64/fp16/bf16), an encoding with
random options (none; rope with interleaved/partial rotary/linear/ntk/yarn/llama3 scaling; hope; fope
learnable and frozen with Hc in {H, Hkv, 1}; alibi with default, per-head, per-batch and learnable slopes;
tapa with random alpha/split/phase scale), causal or not, a softmax scale, positions (default, explicit
int32/int64, per batch, shuffled, negative, gapped, large offsets), input layouts (contiguous, transposed,
sliced views), a thread count and, for some cases, a sliding window and a soft cap, and checks
``fused_attention(..., backend="cpu")`` forward and every gradient (q, k, v, learnable parameters) with the
FlashAttention idiom of tests/helpers.py:
``|x - x64| <= 2 |x_ref_dtype - x64| + floor``, where

* the yardstick ``x_ref_dtype`` is the less accurate of the reference's autograd and FlashAttention's backward
  formulas, both in the input dtype (_flash_style_grads: they differ where an exact 0 comes from cancellation);
* the floor is relative beyond 1 (``FLOOR[dtype] * max(1, max |x64|)``): gradients here reach 1e6; float64 TAPA
  adds ``16 eps |psi|max`` (the phase's own conditioning, which the float64 reference, being the oracle, hides);
* fp16/bf16 gradients are compared with the exact gradient *given the backend's rounded output* (the backward's
  rowsum(dO * O) uses the output in the input dtype, as FlashAttention's does; see run_case);
* cases whose exact answer overflows fp16/bf16 are counted, not compared.

Case ``i`` of seed ``s`` depends only on ``(s, i)``: ``--seed s --only i`` replays one case.

``--bad-bindings [CATS]`` hands the private ``_C.forward`` / ``_C.backward`` bindings inputs they must refuse
(wrong-shaped lse / out / dout, ALiBi slopes whose batch is neither 1 nor B, positions of the wrong shape or out
of range, wrong-sized encoding tensors, window bounds below -1, bad soft caps, ...): each must raise a Python
exception; inputs valid in another form (dtype, strides, no-op windows and caps) must raise or give the valid
call's result. A missing check may read out of bounds, which only a
sanitized build (scripts/sanitize.sh) reliably reports; a plain build may return garbage ("accepted": a failure
too) or crash.

``--extreme-positions N`` adds N cases with positions near the int64 limits and the documented position range:
the answer must be correct, or a ValueError from both the reference and the backend (signed overflow there is a
UBSan finding).

Exit status: 0 when every case passed, 1 otherwise. The last line is a one-line summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import random
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/helpers.py: the accuracy idiom the test suite uses

from fused_posenc import ALiBi, FoPE, HoPE, RoPE, TAPA, fused_attention, reference_attention  # noqa: E402
from helpers import FLOOR, assert_fa_close, max_err  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ENCODINGS = ["none", "rope", "hope", "fope", "fope-learnable", "alibi", "tapa"]
# seqlens near the kernels' 64-row blocks and tiles are drawn more often
EDGE_LENS = [1, 2, 3, 31, 63, 64, 65, 127, 128, 129, 130]
HEADDIMS_ANY = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 40, 47, 48, 63, 64, 65, 80, 96, 127, 128]
EXTREME = 1_000_000  # first index of the --extreme-positions cases
BAD_CATEGORIES = ["lse", "slopes", "dout", "out", "dtypes", "strides", "positions", "encoding", "scoreopts"]


# ---- case generation ---------------------------------------------------------------------------------------
def _len(rng: random.Random) -> int:
    return rng.choice(EDGE_LENS) if rng.random() < 0.4 else rng.randint(1, 130)


def _headdim(rng: random.Random, enc: str) -> int:
    if enc in ("rope", "hope"):
        pool = [d for d in HEADDIMS_ANY if d % 2 == 0]
    elif enc.startswith("fope"):
        pool = [d for d in HEADDIMS_ANY if d % 2 == 0 and d >= 4]
    elif enc == "tapa":
        pool = [d for d in HEADDIMS_ANY if d >= 2]
    else:
        pool = HEADDIMS_ANY
    return rng.choice(pool)


def _encoding(rng: random.Random, name: str, d: int, h: int, hkv: int, b: int):
    """(encoding instance, parameters whose gradients are checked, description)."""
    if name == "none":
        return "none", [], "none"
    if name == "rope":
        opts = {}
        if rng.random() < 0.3:
            opts["base"] = rng.choice([500.0, 10000.0, 500000.0])
        if rng.random() < 0.3 and d >= 4:
            opts["rotary_dim"] = rng.randrange(2, d + 1, 2)
        if rng.random() < 0.4:
            opts["interleaved"] = True
        if rng.random() < 0.4:
            kind = rng.choice(["linear", "ntk", "yarn", "llama3"])
            s = {"type": kind, "factor": rng.choice([2.0, 4.0, 8.0])}
            if kind in ("yarn", "llama3"):
                s["original_max_position_embeddings"] = rng.choice([16, 64, 256])
            opts["scaling"] = s
        return RoPE(**opts), [], f"rope{opts}"
    if name == "hope":
        opts = {"train_len": rng.choice([16, 64, 256, 4096])}
        if rng.random() < 0.3:
            opts["min_cycles"] = rng.choice([0.0, 0.5, 2.0])
        return HoPE(**opts), [], f"hope{opts}"
    if name.startswith("fope"):
        learnable = name == "fope-learnable"
        hc = rng.choice(sorted({h, hkv, 1}))
        train_len = rng.choice([64, 256, 4096])
        enc = FoPE(d, hc, train_len=train_len, sigma=rng.choice([0.0, 0.3, 1.0]), learnable=learnable,
                   seed=rng.randrange(1 << 30))
        params = [enc.cos_coef, enc.sin_coef] if learnable else []
        return enc, params, f"fope(d={d}, hc={hc}, train_len={train_len}, learnable={learnable})"
    if name == "alibi":
        kind = rng.choice(["default", "per-head", "per-batch", "learnable"])
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        if kind == "default":
            return ALiBi(), [], "alibi(default)"
        shape = (h,) if kind == "per-head" or (kind == "learnable" and rng.random() < 0.5) else (b, h)
        slopes = torch.rand(shape, generator=g) * 0.5
        if kind == "learnable":
            slopes.requires_grad_()
        return ALiBi(slopes=slopes), [slopes] if kind == "learnable" else [], f"alibi({kind} {shape})"
    if name == "tapa":
        opts = {"alpha": rng.choice([0.0, 0.1, 0.5, 1.0, rng.uniform(0.0, 1.5)]),
                "theta_split": rng.choice([0.5, rng.uniform(0.05, 0.95)]),
                "phase_scale": rng.choice([2 * math.pi, 1.0, rng.uniform(0.1, 3.0)])}
        return TAPA(**opts), [], f"tapa{ {k: round(v, 4) for k, v in opts.items()} }"
    raise ValueError(name)


def _positions(rng: random.Random, b: int, lq: int, lk: int, extreme: bool, enc: str):
    """(q_positions, k_positions, description); None, None for the defaults."""
    kinds = ["default", "arange", "per-batch", "shuffled", "negative", "gaps", "large"]
    kind = "extreme" if extreme else rng.choice(kinds)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dt = rng.choice([torch.int64, torch.int32]) if kind not in ("large", "extreme") else torch.int64
    pb = rng.choice([1, b])  # (L,) or (B, L)

    def rows(fn):
        r = torch.stack([fn() for _ in range(pb)])
        return (r[0] if pb == 1 and rng.random() < 0.5 else r).to(dt)

    if kind == "default":
        return None, None, "default"
    if kind == "arange":
        return torch.arange(lk - lq, lk, dtype=dt), torch.arange(lk, dtype=dt), "arange"
    if kind == "per-batch":
        offs = [rng.randint(-20, 20) for _ in range(b)]
        qp = torch.stack([torch.arange(lq) + lk - lq + o for o in offs]).to(dt)
        kp = torch.stack([torch.arange(lk) + rng.randint(-5, 5) for _ in range(b)]).to(dt)
        return qp, kp, f"per-batch{offs}"
    if kind == "shuffled":
        qp = rows(lambda: torch.randperm(lq, generator=g) + (lk - lq))
        return qp, rows(lambda: torch.randperm(lk, generator=g)), "shuffled"
    if kind == "negative":
        o = rng.randint(-1000, -1)
        return rows(lambda: torch.arange(lq) + o + lk - lq), rows(lambda: torch.arange(lk) + o), f"negative({o})"
    if kind == "gaps":
        s = rng.randint(2, 7)
        return rows(lambda: torch.arange(lq) * s + rng.randint(0, 9)), \
            rows(lambda: torch.sort(torch.randint(0, s * max(lq, lk) + 10, (lk,), generator=g)).values), f"gaps({s})"
    if kind == "large":
        # offsets where float32 still holds the positions exactly (2^24) or nearly so; keys split far apart
        o = rng.choice([1 << 16, 1_000_000, (1 << 24) - 200, -(1 << 20)]) + rng.randint(-50, 50)
        kp = torch.arange(lk) + o
        if rng.random() < 0.5 and lk > 1:
            kp = torch.cat([torch.arange(lk // 2), torch.arange(lk - lk // 2) + o])
        return (torch.arange(lq) + o + lk - lq).to(dt), kp.to(dt), f"large({o})"
    # extreme: near the int64 limits
    big = (1 << 63) - 1
    o = rng.choice([big - 200, -big + 50, (1 << 62), -(1 << 62), (1 << 53) + 1])
    qp = torch.arange(lq) + (o if o < 0 else o - lq - 10)
    kp = torch.arange(lk) + (o if o < 0 else o - lk - 10)
    if rng.random() < 0.5 and enc != "tapa":  # distances near 2^63 (TAPA's phase would be noise there)
        kp = torch.where(torch.arange(lk) % 2 == 0, kp, -kp)
    return qp, kp, f"extreme({o})"


def _score_opts(rng: random.Random) -> dict:
    """fused_attention's window_size / softcap arguments for a case: none for most cases."""
    kw = {}
    if rng.random() < 0.25:
        def side():
            return rng.choice([-1, 0, 1, 2, 5, rng.randint(0, 70), 1000])

        w = (side(), side())
        kw["window_size"] = w if w != (-1, -1) else (rng.randint(0, 10), -1)
    if rng.random() < 0.2:
        kw["softcap"] = rng.choice([0.5, 2.0, 30.0, rng.uniform(0.1, 50.0)])
    return kw


def _layout(rng: random.Random, t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A leaf with t's values in a random memory layout (inputs of any strides are allowed)."""
    kind = rng.choice(["contiguous", "contiguous", "transposed", "sliced"])
    t = t.detach()
    if kind == "transposed":  # (B, H, L, D) memory
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "sliced":  # a view into a wider buffer: last dim not the whole row
        pad = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        pad[..., 1:1 + t.shape[-1]] = t
        t = pad[..., 1:1 + t.shape[-1]]
    return t.requires_grad_(), kind


@dataclasses.dataclass
class Case:
    index: int
    desc: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    enc: object
    params: list
    causal: bool
    kw: dict
    threads: int


def _tapa_phase_bound(c: Case) -> float:
    """A bound on TAPA's |psi| = c/sqrt(Dp) |m - n|^alpha |q_P . k_P| in case c (0 for other encodings). In float64
    the reference is the oracle, so its error (the idiom's yardstick) is 0; yet psi reaches 1e7 rad at distances
    of 10^6, and any float64 evaluation of it (the reference's included) is off by ~eps |psi|: the floor's share."""
    if not isinstance(c.enc, TAPA):
        return 0.0
    from fused_posenc.attention import prepare

    p = prepare(c.q, c.k, c.v, c.enc, c.causal, c.kw["softmax_scale"], c.kw["q_positions"], c.kw["k_positions"])
    d = c.q.shape[-1]
    da = c.enc.split(d)
    if p.q_pos.numel() == 0 or p.k_pos.numel() == 0:
        return 0.0
    dist = max(abs(int(p.q_pos.max()) - int(p.k_pos.min())), abs(int(p.k_pos.max()) - int(p.q_pos.min())))
    qn = c.q.detach().double()[..., da:].norm(dim=-1).max().item()
    kn = c.k.detach().double()[..., da:].norm(dim=-1).max().item()
    return c.enc.phase_factor(d) * float(dist) ** c.enc.alpha * qn * kn


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of ``seed``; indices from EXTREME on have positions near the int64 limits."""
    extreme = index >= EXTREME
    rng = random.Random(seed * 1_000_003 + index * 7919)
    b = rng.randint(1, 3)
    lq, lk = _len(rng), _len(rng)
    if rng.random() < 0.2:
        lk = lq
    hkv = rng.randint(1, 3)
    h = hkv * rng.choice([1, 1, 2, 3, 4])
    name = rng.choice(ENCODINGS)
    d = _headdim(rng, name)
    dv = d if rng.random() < 0.6 else rng.choice([1, 3, 8, 16, 33, 64, 100])
    dtype = rng.choice(DTYPES)
    causal = rng.random() < 0.5
    enc, params, edesc = _encoding(rng, name, d, h, hkv, b)
    qp, kp, pdesc = _positions(rng, b, lq, lk, extreme, name)
    scale = None if rng.random() < 0.7 else rng.choice([0.05, 0.3, 1.0, 2.0])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    mag = 1.0 if dtype in (torch.float32, torch.float64) or rng.random() < 0.7 else 3.0
    raw = [torch.randn(s, generator=g) * mag for s in ((b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, dv))]
    leaves, layouts = zip(*(_layout(rng, r.to(dtype)) for r in raw))
    kw = {"softmax_scale": scale, "q_positions": qp, "k_positions": kp}
    threads = rng.choice([1, 2, 3])
    opts = _score_opts(rng)  # drawn last: the cases of earlier versions of this script stay as they were otherwise
    kw.update(opts)
    desc = (f"case {index}: B={b} Lq={lq} Lk={lk} H={h} Hkv={hkv} D={d} Dv={dv} {str(dtype)[6:]} {edesc} "
            f"causal={causal} scale={scale} pos={pdesc} layout={'/'.join(layouts)} threads={threads}"
            + "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in opts.items()))
    return Case(index, desc, *leaves, enc, params, causal, kw, threads)


# ---- one comparison -----------------------------------------------------------------------------------------
def _prepare(c: Case, q, k, v):
    from fused_posenc.attention import prepare

    return prepare(q, k, v, c.enc, c.causal, c.kw["softmax_scale"], c.kw["q_positions"], c.kw["k_positions"],
                   c.kw.get("window_size", (-1, -1)), c.kw.get("softcap"))


def _visible(p):
    """``(Bp, Lq, Lk)`` bool: the keys each query sees (the causal rule and the window), or None: all of them."""
    if not p.causal and p.window is None:
        return None
    d = p.q_pos[:, :, None] - p.k_pos[:, None, :]
    vis = d >= 0 if p.causal else torch.ones_like(d, dtype=torch.bool)
    if p.window is not None:
        left, right = p.window
        vis = vis & ((d <= left) if left >= 0 else True) & ((-d <= right) if right >= 0 else True)
    return vis


def _fwd_bwd(fn, q, k, v, do, params):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, [q, k, v, *params], do, allow_unused=True)
    return out.detach(), [None if x is None else x.detach() for x in grads]


def _flash_style_grads(c: Case, do):
    """The gradients (q, k, v, params) by FlashAttention's backward formulas, in the input dtype as the reference
    computes there: P = exp(s - lse), dS = P (dP - rowsum(dO * O)), scores as fused_posenc/reference.py forms them.
    The idiom's "same computation in the input dtype" is this one as much as the reference's softmax autograd; the
    two differ where the exact gradient is 0 by cancellation (a row that sees a single key: dS = 0), which the
    softmax autograd gets bitwise and any dO.O-based backward only to rounding."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (c.q, c.k, c.v))
    p = _prepare(c, q, k, v)
    h, hkv = q.shape[2], k.shape[2]
    qe, ke, ve = q, k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    if p.encoding.is_rotation:
        qe, ke = p.encoding.rotate(qe, p.q_pos, h, hkv), p.encoding.rotate(ke, p.k_pos, h, hkv)
    sm = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = p.encoding.scores(qe, ke, p.q_pos, p.k_pos, p.softmax_scale, causal=c.causal, softcap=p.softcap).to(sm)
    visible = _visible(p)  # (B, H, Lq, Lk) scores; (Bp, Lq, Lk) visibility
    if visible is not None:
        s = s.masked_fill(~visible[:, None], float("-inf"))
        s = s.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
    with torch.no_grad():
        P = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
        if visible is not None:
            P = P.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
    out = torch.einsum("bhmn,bnhd->bmhd", P.to(v.dtype), ve)  # (B, Lq, H, Dv): differentiable in v only
    with torch.no_grad():
        dp = torch.einsum("bmhd,bnhd->bhmn", do, ve).to(sm)
        delta = (do * out).sum(-1).transpose(1, 2).to(sm)  # (B, H, Lq)
        ds = P * (dp - delta[..., None])
    leaves = [q, k, *c.params]
    grads = list(torch.autograd.grad(s, leaves, ds, allow_unused=True, retain_graph=True))
    dv = torch.autograd.grad(out, v, do)[0]
    return [grads[0], grads[1], dv, *grads[2:]]


def _rounded_output_correction(c: Case, q64, k64, v64, out, out64, do, params):
    """Gradients (w.r.t. q, k, v, params) of ``-sum_m delta_m lse_m``: what the backward's rowsum(dO * O) taken from
    the backend's rounded output ``out`` instead of the exact ``out64`` adds to the float64 gradients. The scores
    are formed as the reference forms them (fused_posenc/reference.py), in float64."""
    p = _prepare(c, q64, k64, v64)
    h, hkv = q64.shape[2], k64.shape[2]
    q, k = q64, k64.repeat_interleave(h // hkv, dim=2)
    if p.encoding.is_rotation:
        q = p.encoding.rotate(q, p.q_pos, h, hkv)
        k = p.encoding.rotate(k, p.k_pos, h, hkv)
    s = p.encoding.scores(q, k, p.q_pos, p.k_pos, p.softmax_scale, causal=c.causal, softcap=p.softcap).double()
    visible = _visible(p)  # (B, H, Lq, Lk) scores; (Bp, Lq, Lk) visibility
    if visible is not None:
        s = s.masked_fill(~visible[:, None], float("-inf"))
        s = s.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)  # empty rows: out is 0 on both sides, delta 0
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    delta = (do.double() * (out.double() - out64.detach())).sum(-1).transpose(1, 2)  # (B, H, Lq)
    leaves = [q64, k64, v64, *params]
    return torch.autograd.grad(-(delta * lse).sum(), leaves, allow_unused=True)


def run_case(c: Case) -> str:
    """'ok', 'rejected' (both sides raised ValueError: outside the documented range) or raises AssertionError."""
    torch.set_num_threads(c.threads)
    g = torch.Generator().manual_seed(c.index)
    do = torch.randn(*c.q.shape[:-1], c.v.shape[-1], generator=g).to(c.q.dtype)

    def cpu(q, k, v):
        return fused_attention(q, k, v, c.enc, causal=c.causal, backend="cpu", **c.kw)

    def ref(q, k, v):
        return reference_attention(q, k, v, c.enc, causal=c.causal, **c.kw)

    errors = []
    results = []
    for fn in (cpu, ref):
        try:
            results.append(_fwd_bwd(fn, c.q, c.k, c.v, do, c.params))
            errors.append(None)
        except ValueError as e:
            results.append(None)
            errors.append(e)
    if errors[0] is not None or errors[1] is not None:
        if errors[0] is not None and errors[1] is not None:
            return "rejected"
        who = "backend" if errors[0] is not None else "reference"
        raise AssertionError(f"only the {who} raised: {errors[0] or errors[1]}")
    (out, grads), (out_lp, grads_lp) = results
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (c.q, c.k, c.v))
    out64, grads64 = _fwd_bwd(ref, q64, k64, v64, do.double(), c.params)
    names = ["out", "dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(c.params))]
    tests, lows, exact = [out, *grads], [out_lp, *grads_lp], [out64, *grads64]
    for name, x, x64 in zip(names, tests, exact):
        assert x is not None and x64 is not None, f"{name}: missing gradient"
        if x.dtype in (torch.float16, torch.bfloat16) and x64.abs().max() > torch.finfo(x.dtype).max / 2:
            return "overflow"  # the exact answer does not fit the dtype: inf is right, nothing to compare
    if c.q.dtype in (torch.float16, torch.bfloat16):
        # The kernels (as FlashAttention) form the backward's rowsum(dO * O) from the output rounded to the input
        # dtype, so their exact target is the gradient with that rowsum: the float64 gradient plus that of
        # -sum_m delta_m lse_m with delta_m = rowsum(dO * (O_backend - O_exact)). It differs from the float64
        # gradient by up to ~20 units of fp16/bf16 rounding (dk with long GQA groups), and the reference in the
        # dtype does not share it, so the idiom's bound alone would flag correct kernels.
        corr = _rounded_output_correction(c, q64, k64, v64, out, out64, do, c.params)
        exact = [out64] + [x if d is None else x + d for x, d in zip(grads64, corr)]
    phase_floor = 16 * 2.0**-53 * _tapa_phase_bound(c) if c.q.dtype == torch.float64 else 0.0
    flash = [None, *_flash_style_grads(c, do)]
    for name, x, xlp, xfa, x64 in zip(names, tests, lows, flash, exact):
        # the idiom's floors are absolute, for values of order 1; here gradients reach 1e6 (TAPA's Omega at long
        # distances, large softmax scales), so the floor scales with the largest exact value beyond 1
        # (learnable parameters' gradients are float32 whatever the inputs are: the coarser of the two floors)
        scale = max(1.0, x64.abs().max().item())
        floor = max(FLOOR[c.q.dtype], FLOOR[x.dtype]) * scale + phase_floor * scale
        if xfa is not None and max_err(xfa, x64) > max_err(xlp, x64):
            xlp = xfa  # the yardstick: the less accurate of the two computations in the input dtype
        assert_fa_close(name, x, x64, xlp, floor=floor)
    return "ok"


# ---- bad inputs to the private bindings ---------------------------------------------------------------------
def _binding_args(q, k, v, enc, causal, q_pos=None, k_pos=None):
    """The extension's argument lists for one call, packed the way ops/native.py packs them."""
    from fused_posenc.attention import prepare
    from fused_posenc.ops import native

    p = prepare(q, k, v, enc, causal, None, q_pos, k_pos)
    b, lq, lk, h, hkv, d, dv = p.shape
    kp = p.encoding.kernel_params(d, h, hkv, b, q.device)
    scale = float(p.encoding.score_scale(d, None))
    return p, kp, scale, native


def _score_args(p):
    """causal, window_left, window_right, softcap of a Problem, as the bindings take them (-1: unbounded, 0: none)."""
    left, right = (-1, -1) if p.window is None else p.window
    return [p.causal, left, right, 0.0 if p.softcap is None else p.softcap]


def _call_fwd(p, kp, scale, native, q=None):
    args = native._param_args(kp, kp.fope_cos_coef, kp.fope_sin_coef, p.q.device)
    return native._launch_fwd(p.q if q is None else q, p.k, p.v, p.q_pos.contiguous(), p.k_pos.contiguous(),
                              *_score_args(p), scale, args)


def _call_bwd(p, kp, scale, native, do, out, lse):
    args = native._param_args(kp, kp.fope_cos_coef, kp.fope_sin_coef, p.q.device)
    known = [do, p.q, p.k, p.v, out, lse, p.q_pos.contiguous(), p.k_pos.contiguous(), *_score_args(p), scale, args]
    # trailing switches (want_coef, want_slopes, ...: which parameter gradients to form) are all off
    params = list(inspect.signature(native._launch_bwd).parameters)
    extra = params[len(known):]
    if not all(x.startswith("want_") for x in extra):
        raise RuntimeError(f"ops/native.py _launch_bwd{tuple(params)}: unexpected parameters after enc_args")
    return native._launch_bwd(*known, *[False] * len(extra))


def bad_binding_cases(rng: random.Random, cats):
    """Yield ``(category, description, thunk, baseline, mode)``: ``baseline()`` is the valid call (it must work);
    mode ``"raise"``: ``thunk()`` must raise; ``"same"``: raise or return what the baseline returns (inputs that are
    valid in another form: dtype, layout); ``"any"``: any result or exception, only never a crash."""
    from fused_posenc.encodings.alibi import alibi_slopes

    for _ in range(2):
        b, lq, lk = rng.randint(2, 3), rng.choice([1, 5, 64, 70]), rng.choice([1, 7, 64, 80])
        hkv = rng.randint(1, 2)
        h, d = hkv * rng.choice([1, 2]), rng.choice([8, 32])
        dtype = rng.choice([torch.float32, torch.float64])
        causal = rng.random() < 0.5
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        q, k, v = (torch.randn(s, generator=g).to(dtype) for s in ((b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, d)))
        tag = f"B={b} Lq={lq} Lk={lk} H={h} Hkv={hkv} D={d} {str(dtype)[6:]} causal={causal}"
        enc = rng.choice(["rope", "alibi", "tapa", "none"])
        p, kp, scale, native = _binding_args(q, k, v, enc, causal)
        out, lse = _call_fwd(p, kp, scale, native)
        do = torch.randn(out.shape, generator=g).to(dtype)

        def base(p=p, kp=kp, scale=scale, native=native, do=do, out=out, lse=lse):
            return _call_bwd(p, kp, scale, native, do, out, lse)

        def bwd_with(do_=None, out_=None, lse_=None, p=p, kp=kp, scale=scale, native=native, do=do, out=out, lse=lse):
            return lambda: _call_bwd(p, kp, scale, native, do if do_ is None else do_, out if out_ is None else out_,
                                     lse if lse_ is None else lse_)

        def fwd_with(pa=p, kpa=kp, sca=scale, nat=native, **pos):
            pa = dataclasses.replace(pa, **pos)
            return lambda: _call_fwd(pa, kpa, sca, nat)

        base_f = fwd_with()
        if "lse" in cats:
            bad = {"lse (B,H,Lq-1)": lse[..., :-1].contiguous() if lq > 1 else lse.new_empty(b, h, 0),
                   "lse (B,H)": lse[..., 0].contiguous(), "lse (1,H,Lq)": lse[:1].contiguous(),
                   "lse (B*H*Lq,) flat": lse.flatten(), "lse empty": lse.new_empty(0),
                   "lse (B,H,Lq+5)": torch.cat([lse, lse.new_zeros(b, h, 5)], -1)}
            for name, t in bad.items():
                yield "lse", f"{name} [{enc} {tag}]", bwd_with(lse_=t), base, "raise"
        if "dout" in cats:
            bad = {"dout and out (B,Lq-1,H,Dv)": (do[:, :-1], out[:, :-1]) if lq > 1 else None,
                   "dout and out (B,Lq,H,Dv-1)": (do[..., :-1].contiguous(), out[..., :-1].contiguous()),
                   "dout and out (B,Lq,H//2,Dv)": (do[:, :, : h // 2].contiguous(), out[:, :, : h // 2].contiguous())
                   if h > 1 else None,
                   "dout and out (B-1,Lq,H,Dv)": (do[:-1], out[:-1]),
                   "dout and out flat": (do.flatten(), out.flatten()),
                   "dout (B,Lq,H,Dv+1)": (torch.cat([do, do[..., :1]], -1), None)}
            for name, pair in bad.items():
                if pair is not None:
                    yield "dout", f"{name} [{enc} {tag}]", bwd_with(do_=pair[0], out_=pair[1]), base, "raise"
        if "out" in cats:
            yield "out", f"out (B,Lq,H,Dv-1) [{enc} {tag}]", bwd_with(out_=out[..., :-1].contiguous()), base, "raise"
            yield "out", f"out empty [{enc} {tag}]", bwd_with(out_=out.new_empty(0)), base, "raise"
        if "dtypes" in cats:
            other = torch.float64 if dtype == torch.float32 else torch.float32
            yield "dtypes", f"lse int64 [{enc} {tag}]", bwd_with(lse_=lse.to(torch.int64)), base, "raise"
            # an integer dout is converted like any other dtype (lse must be floating): the same as its float copy
            do_i = (do * 4).round().to(torch.int64)
            yield "dtypes", f"dout int64 [{enc} {tag}]", bwd_with(do_=do_i), \
                (lambda do_f=do_i.to(dtype): bwd_with(do_=do_f)()), "same"
            yield "dtypes", f"lse {str(other)[6:]} [{enc} {tag}]", bwd_with(lse_=lse.to(other)), \
                (lambda lse_o=lse.to(other).to(dtype): bwd_with(lse_=lse_o)()), "same"
        if "strides" in cats:  # valid values in other layouts
            lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)
            do_t = do.transpose(1, 2).contiguous().transpose(1, 2)
            yield "strides", f"lse transposed view [{enc} {tag}]", bwd_with(lse_=lse_t), base, "same"
            yield "strides", f"dout transposed view [{enc} {tag}]", bwd_with(do_=do_t), base, "same"
        if "positions" in cats:
            qp, kp_ = p.q_pos, p.k_pos
            yield "positions", f"q_pos (1,Lq+1) [{enc} {tag}]", \
                fwd_with(q_pos=torch.arange(lq + 1)[None] + lk - lq), base_f, "raise"
            if b > 2:
                yield "positions", f"k_pos (B-1,Lk) [{enc} {tag}]", fwd_with(k_pos=kp_.expand(b - 1, lk)), base_f, \
                    "raise"
            yield "positions", f"k_pos (B+1,Lk) [{enc} {tag}]", fwd_with(k_pos=kp_.expand(b + 1, lk)), base_f, "raise"
            yield "positions", f"q_pos 1-D [{enc} {tag}]", fwd_with(q_pos=qp[0]), base_f, "raise"
            yield "positions", f"q_pos int32 [{enc} {tag}]", fwd_with(q_pos=qp.to(torch.int32)), base_f, "same"
            # positions at the int64 limits and the edges of the documented range [-2^62, 2^62), for the paths
            # that form position spans and distances (rotation tables, TAPA's Omega, ALiBi): an error or an answer,
            # never undefined behaviour (hi + 1 or k - q overflowing is a UBSan finding)
            top, bottom = (1 << 63) - 1, -(1 << 63)
            spans = {"at the int64 top": (top - lq + 1, top - lk + 1), "at the int64 bottom": (bottom, bottom),
                     "q at the top, k at the bottom": (top - lq + 1, bottom),
                     "q at 2^62 - Lq, k at -2^62 (the range's edges)": ((1 << 62) - lq, -(1 << 62)),
                     "q at -2^62 - 1": (-(1 << 62) - 1, 0)}
            for enc_s in sorted({enc, "rope", "tapa", "alibi"}):
                ps, kps, scs, nat = _binding_args(q, k, v, enc_s, causal)
                for name, (q0, k0) in spans.items():
                    qs, ks = torch.arange(lq) + q0, torch.arange(lk) + k0  # no torch overflow: q0 + lq - 1 <= top
                    yield "positions", f"positions {name} [{enc_s} {tag}]", \
                        fwd_with(ps, kps, scs, nat, q_pos=qs[None], k_pos=ks[None]), base_f, "any"
        if "scoreopts" in cats:  # window bounds and soft caps the bindings must refuse (Problem fields bypass prepare)
            bad = {"window (-2, 3)": {"window": (-2, 3)}, "window (4, -7)": {"window": (4, -7)},
                   "window (-2**63, 0)": {"window": (-(1 << 63), 0)}, "softcap -1": {"softcap": -1.0},
                   "softcap nan": {"softcap": float("nan")}, "softcap inf": {"softcap": float("inf")},
                   "softcap 1e-50 (0 in float32)": {"softcap": 1e-50},
                   "softcap 1e39 (inf in float32)": {"softcap": 1e39}}
            for name, repl in bad.items():
                yield "scoreopts", f"{name} [{enc} {tag}]", fwd_with(**repl), base_f, "raise"
                pb = dataclasses.replace(p, **repl)
                yield "scoreopts", f"{name} backward [{enc} {tag}]", \
                    (lambda pb=pb: _call_bwd(pb, kp, scale, native, do, out, lse)), base, "raise"
            # no-ops in another form: a window wider than every distance, a cap far above every score
            yield "scoreopts", f"window (2**63-1, 2**63-1) [{enc} {tag}]", \
                fwd_with(window=((1 << 63) - 1, (1 << 63) - 1)), base_f, "same"
            yield "scoreopts", f"softcap 1e30 [{enc} {tag}]", fwd_with(softcap=1e30), base_f, "same"
            # windows and caps at the edges of the position range: an answer or an error, never undefined behaviour
            for w in ((0, 0), (5, -1), (-1, 3), ((1 << 63) - 1, 0)):
                qs, ks = torch.arange(lq) + (1 << 62) - lq, torch.arange(lk) - (1 << 62)
                yield "scoreopts", f"window {w} softcap 2 at the range's edges [{enc} {tag}]", \
                    fwd_with(window=w, softcap=2.0, q_pos=qs[None], k_pos=ks[None]), base_f, "any"
        if "slopes" in cats:
            for sb in [s for s in (2, 3, 4) if s not in (1, b)][:2]:
                pa, kpa, sca, nat = _binding_args(q, k, v, "alibi", causal)
                slopes = alibi_slopes(h)[None].repeat(sb, 1).contiguous()
                kpb = dataclasses.replace(kpa, slopes=slopes)
                base_s = fwd_with(pa, kpa, sca, nat)
                yield "slopes", f"forward slopes ({sb},H) for B={b} [{tag}]", fwd_with(pa, kpb, sca, nat), base_s, \
                    "raise"
                o_a, l_a = _call_fwd(pa, kpa, sca, nat)
                yield "slopes", f"backward slopes ({sb},H) for B={b} [{tag}]", \
                    (lambda pa=pa, kpb=kpb, sca=sca, nat=nat, o_a=o_a, l_a=l_a:
                     _call_bwd(pa, kpb, sca, nat, torch.ones_like(o_a), o_a, l_a)), base_s, "raise"
            pa, kpa, sca, nat = _binding_args(q, k, v, "alibi", causal)
            base_s = fwd_with(pa, kpa, sca, nat)
            for name, sl in {"slopes (1,H+1)": alibi_slopes(h + 1)[None], "slopes (H,)": alibi_slopes(h),
                             "slopes empty": torch.empty(0)}.items():
                kpx = dataclasses.replace(kpa, slopes=sl)
                yield "slopes", f"forward {name} [{tag}]", fwd_with(pa, kpx, sca, nat), base_s, "raise"
        if "encoding" in cats:  # the encodings' other tensors, for the rotation and TAPA kinds
            pr, kpr, scr, nat = _binding_args(q, k, v, "rope", causal)
            base_r = fwd_with(pr, kpr, scr, nat)
            bad = {"idx1 index = headdim": {"idx1": torch.full_like(kpr.idx1, d)},
                   "idx2 index -1": {"idx2": torch.full_like(kpr.idx2, -1)}}
            bad.update(_resized_fields(kpr, ("idx1", "idx2", "pair_freqs", "pair_turns", "pair_turns64", "pair_scale")))
            for name, repl in bad.items():
                kpx = dataclasses.replace(kpr, **repl)
                if _reaches_binding(nat, kpr, kpx):
                    yield "encoding", f"rope {name} [{tag}]", fwd_with(pr, kpx, scr, nat), base_r, "raise"
            pt, kpt, sct, nat = _binding_args(q, k, v, "tapa", causal)
            for split in (0, d, -1):
                kpx = dataclasses.replace(kpt, tapa_split=split)
                yield "encoding", f"tapa_split {split} [{tag}]", fwd_with(pt, kpx, sct, nat), \
                    fwd_with(pt, kpt, sct, nat), "raise"
            fope = FoPE(d, h, train_len=64, seed=1)
            pf, kpf, scf, nat = _binding_args(q, k, v, fope, causal)
            bad = _resized_fields(kpf, ("idx1", "idx2", "fope_freqs", "fope_turns", "fope_cos_coef", "fope_sin_coef",
                                        "fope_pad"))
            bad["cos_coef (H,Dk,P-1)"] = {"fope_cos_coef": kpf.fope_cos_coef[..., :-1].contiguous()}
            bad["sin_coef (H,Dk-1,P)"] = {"fope_sin_coef": kpf.fope_sin_coef[:, :-1].contiguous()}
            for name, repl in bad.items():
                kpx = dataclasses.replace(kpf, **repl)
                if _reaches_binding(nat, kpf, kpx):
                    yield "encoding", f"fope {name} [{tag}]", fwd_with(pf, kpx, scf, nat), \
                        fwd_with(pf, kpf, scf, nat), "raise"


def _resized_fields(kp, names):
    """{description: {field: tensor}}: each tensor field of ``kp`` one entry short and one entry long along dim 0."""
    out = {}
    for f in names:
        t = getattr(kp, f, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= 1:
            out[f"{f} {tuple(t.shape)} one row short"] = {f: t[:-1].contiguous()}
            out[f"{f} {tuple(t.shape)} one row long"] = {f: torch.cat([t, t[:1]]).contiguous()}
    return out


def _reaches_binding(native, kp, kpx) -> bool:
    """Whether a changed KernelParams changes the extension's arguments (fields the package does not pass don't)."""
    a = native._param_args(kp, kp.fope_cos_coef, kp.fope_sin_coef, torch.device("cpu"))
    b = native._param_args(kpx, kpx.fope_cos_coef, kpx.fope_sin_coef, torch.device("cpu"))

    def same(x, y):
        if isinstance(x, torch.Tensor):
            return x is y or (x.numel() == 0 and y.numel() == 0)
        return x == y

    return not all(same(x, y) for x, y in zip(a, b))


def _same(a, b) -> bool:
    """Whether two binding results (tensors or lists of tensors; empty ones stand for "none") agree."""
    def flat(x):
        return [x] if isinstance(x, torch.Tensor) else list(x)

    def empty(t):
        return t is None or (isinstance(t, torch.Tensor) and t.numel() == 0)

    a, b = flat(a), flat(b)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if empty(x) and empty(y):
            continue
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
            return False
        if not torch.allclose(x.double(), y.double(), rtol=1e-6, atol=1e-6, equal_nan=True):
            return False
    return True


def run_bad_bindings(seed: int, cats, verbose: bool):
    rng = random.Random(seed * 31 + 5)
    n = fails = 0
    messages = []
    for cat, desc, thunk, baseline, mode in bad_binding_cases(rng, cats):
        n += 1
        try:  # the harness itself: the unmodified call must work
            expect = baseline()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"bad-bindings harness broken (valid call for {desc!r} failed: {e!r}); "
                               "the _C signature or ops/native.py changed") from e
        if verbose:
            print(f"  bad-binding [{cat}] {desc} (expect: {mode})", flush=True)
        try:
            got = thunk()
        except Exception as e:  # noqa: BLE001 - any Python exception is a right answer
            if verbose:
                print(f"    raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
            continue
        if mode == "any" or (mode == "same" and _same(got, expect)):
            continue
        fails += 1
        why = "accepted (no exception)" if mode == "raise" else "accepted with a different result"
        messages.append(f"bad-binding [{cat}] {desc}: {why}")
        print(f"FAIL {messages[-1]}", flush=True)
    return n, fails, messages


# ---- driver -----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=200, help="random cases (default 200)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="stop drawing new cases after S seconds (at least one case runs)")
    ap.add_argument("--only", type=int, default=None, metavar="I",
                    help=f"run case I only (replay a failure; extreme-position cases are numbered from {EXTREME})")
    ap.add_argument("--bad-bindings", nargs="?", const=",".join(BAD_CATEGORIES), default=None, metavar="CATS",
                    help=f"also fuzz bad inputs to _C.forward/_C.backward (comma list of {','.join(BAD_CATEGORIES)}; "
                         "default all)")
    ap.add_argument("--no-random", action="store_true", help="skip the random cases (with --bad-bindings)")
    ap.add_argument("--extreme-positions", type=int, default=0, metavar="N",
                    help="N extra cases with positions near the int64 limits")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    cats = [x for x in (a.bad_bindings or "").split(",") if x]
    unknown = set(cats) - set(BAD_CATEGORIES)
    if unknown:
        ap.error(f"unknown --bad-bindings categories {sorted(unknown)}")

    from fused_posenc import _C  # a missing extension is an error here, not a skip

    print(f"fuzz_native: fused_posenc._C = {_C.__file__} (vector bytes {_C.cpu_vector_bytes()})", flush=True)
    t0 = time.perf_counter()
    n = rejected = overflow = fails = 0
    old_threads = torch.get_num_threads()
    # the extreme-position cases first (a time budget cuts random cases, not them); numbered from EXTREME
    todo = [] if a.only is not None else [EXTREME + i for i in range(a.extreme_positions)]
    if not a.no_random:
        todo += [a.only] if a.only is not None else list(range(a.iters))
    for i in todo:
        if a.time_budget is not None and n > 0 and time.perf_counter() - t0 > a.time_budget:
            print(f"fuzz_native: time budget {a.time_budget:.0f}s reached after {n} cases", flush=True)
            break
        c = make_case(a.seed, i)
        if a.verbose:
            print(c.desc, flush=True)
        n += 1
        try:
            r = run_case(c)
            rejected += r == "rejected"
            overflow += r == "overflow"
        except Exception as e:  # noqa: BLE001 - every kind of failure is reported with its case
            fails += 1
            msg = f"{c.desc}\n    {type(e).__name__}: {e}"
            if not isinstance(e, AssertionError):
                msg += "\n" + "".join(traceback.format_exception(e)[-6:])
            print(f"FAIL seed={a.seed} {msg}\n    replay: python scripts/fuzz_native.py --seed {a.seed} --only {i}",
                  flush=True)
    torch.set_num_threads(old_threads)
    nb = bfails = 0
    if cats:
        nb, bfails, _ = run_bad_bindings(a.seed, cats, a.verbose)
    dt = time.perf_counter() - t0
    total_fail = fails + bfails
    print(f"fuzz_native: {n} random cases ({rejected} rejected by both, {overflow} beyond the dtype's range), "
          f"{nb} bad-binding cases, "
          f"{total_fail} failures, seed {a.seed}, {dt:.1f}s", flush=True)
    return 1 if total_fail else 0


if __name__ == "__main__":
    sys.exit(main())
