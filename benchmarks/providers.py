"""All benchmark providers: the core ones from ``fused_posenc.bench`` plus the external baselines.

A provider is ``build(encoding, shape) -> fwd`` with ``fwd(q, k, v)`` in the package layout
``(batch, seqlen, heads, headdim)`` returning ``(batch, seqlen, heads, headdim_v)``; it raises ``Skip``
with a reason when it cannot run a call. Every provider computes the same function as
``fused_attention(q, k, v, encoding, causal=...)``: the encoding objects (tables, slopes, TAPA's split)
come from ``fused_posenc.encodings``.

External baselines defined here:

* ``liger+sdpa-<b>``: Liger-Kernel's Triton RoPE (``liger_kernel.ops.rope.LigerRopeFunction``, the op
  behind ``liger_kernel.transformers.rope.liger_rotary_pos_emb``) then SDPA pinned to ``<b>``. Liger takes
  one ``(1, L, D)`` cos/sin table shared by all heads, half layout: RoPE and HoPE (whose dropped pairs have
  cos=1, sin=0) fit; FoPE's per-head tables do not. The tables are computed once at build time, as a model
  computes them once per step for all layers. Liger rotates q and k *in place* (as it does in a model).
  Imported lazily: ``pip install .whl/liger_kernel-0.8.5-py3-none-any.whl`` (pure Python, needs Triton).
* ``flex``: ``torch.nn.attention.flex_attention`` compiled with ``torch.compile``: ``none`` (causal block
  mask), ALiBi as a ``score_mod`` (``score - slope_h |m - n|``), and TAPA as far as a ``score_mod`` can
  express it. A ``score_mod`` only sees the full product ``q . k``; TAPA needs ``q_A . k_A`` and
  ``q_P . k_P`` separately. What we do: the amplitude part goes through flex's own matmul by zeroing q's
  phase dims (``q * mask_A``, so ``score = q_A . k_A / sqrt(Da)``), and the phase product
  ``q_P k_P^T`` is materialised in float32 ``(B, H, L, L)`` and read by the ``score_mod`` as a captured
  buffer (flex differentiates through captured buffers). So "flex TAPA" is exact but O(L^2) in memory:
  it is a baseline for the fused kernel's memory claim, not a flash-style competitor.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from harness import Provider, Shape, Skip, core_providers
from fused_posenc.bench import _encoding, _guard_scores, _probe, sdpa_call

LIGER_HINT = ("liger-kernel is not installed: python -m pip install --no-deps "
              ".whl/liger_kernel-0.8.5-py3-none-any.whl (pure-Python wheel)")


def _triton_device_ok(shape: Shape) -> None:
    if not shape.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("a Triton kernel on CPU tensors needs TRITON_INTERPRET=1")


def liger_sdpa(backend: str):
    def build(encoding: str, shape: Shape):
        try:
            from liger_kernel.ops.rope import LigerRopeFunction
        except Exception as e:  # not installed, or its import fails
            raise Skip(f"{LIGER_HINT} ({type(e).__name__}: {e})")
        _triton_device_ok(shape)
        if encoding not in ("rope", "hope"):
            raise Skip("Liger's RoPE takes one cos/sin table for all heads; FoPE's tables are per head")
        enc = _encoding(encoding, shape)
        from fused_posenc.encodings.base import is_contiguous_split

        if not is_contiguous_split(*enc.pairs(shape.headdim)):
            raise Skip("Liger rotates the half layout over the whole head only")

        def factory(s: Shape):
            pos = torch.arange(s.seqlen, device=s.device)[None]
            c, sn = enc.tables(pos, s.headdim, s.nheads, s.hkv, torch.float32)  # (1, L, 1, D/2)
            cos = torch.cat([c[:, :, 0], c[:, :, 0]], -1).contiguous()  # (1, L, D): HF's duplicated layout
            sin = torch.cat([sn[:, :, 0], sn[:, :, 0]], -1).contiguous()
            inner = sdpa_call(backend, s)

            def fn(q, k, v):
                qr, kr = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                return inner(qr.transpose(1, 2), kr.transpose(1, 2), v)

            return fn

        _probe(factory, shape, f"liger+sdpa-{backend}")
        return factory(shape)

    return build


_FLEX: dict = {}


def _flex():
    """``torch.compile(flex_attention)`` once, with a recompile limit that survives a seqlen sweep."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        import torch._dynamo.config as dc
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(getattr(dc, name), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX["mask"] = create_block_mask
    return _FLEX["fn"], _FLEX["mask"]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex(encoding: str, shape: Shape):
    if not shape.device.startswith("cuda") and os.environ.get("FUSED_POSENC_FLEX_CPU") != "1":
        # FUSED_POSENC_FLEX_CPU=1 builds it anyway (forward on inputs without grad: a math check only)
        raise Skip("FlexAttention has no backward on CPU (and compiles for ~15 s): GPU only here")
    if encoding not in ("none", "alibi", "tapa"):
        raise Skip("a rotation is not a score_mod (rotate, then use SDPA: rotate+sdpa-*)")
    if shape.hkv != shape.nheads:
        raise Skip("GQA not wired for flex here")
    try:
        fa, create_block_mask = _flex()
    except Exception as e:
        raise Skip(f"flex_attention unavailable: {type(e).__name__}: {e}")
    L, dev = shape.seqlen, shape.device
    key = ("mask", L, dev, shape.causal)
    if key not in _FLEX:
        _FLEX[key] = create_block_mask(_causal, None, None, L, L, device=dev) if shape.causal else None
    block_mask = _FLEX[key]
    enc = _encoding(encoding, shape)

    def run(q, k, v, score_mod=None, scale=None):
        o = fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
               block_mask=block_mask, scale=scale)
        return o.transpose(1, 2)

    if encoding == "none":
        return run
    if encoding == "alibi":
        slopes = enc.slopes(shape.nheads, shape.batch, dev)[0].contiguous()  # (H,) float32

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()

        return lambda q, k, v: run(q, k, v, alibi_mod)
    # TAPA: amplitude through flex's matmul, the phase product materialised and captured (see module doc)
    _guard_scores(shape, 3, "flex TAPA (materialised phase product)")
    D = shape.headdim
    da = enc.split(D)
    amp_scale, phase, alpha = enc.score_scale(D, None), enc.phase_factor(D), enc.alpha
    mask_a = torch.zeros(D, device=dev, dtype=shape.torch_dtype)
    mask_a[:da] = 1
    holder = [None]

    def tapa_mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx - kv_idx).abs().to(torch.float32)
        return score * torch.cos(phase * torch.pow(dist, alpha) * holder[0][b, h, q_idx, kv_idx])

    def fn(q, k, v):
        holder[0] = torch.einsum("bmhd,bnhd->bhmn", q[..., da:].float(), k[..., da:].float())
        try:
            return run(q * mask_a, k, v, tapa_mod, amp_scale)
        finally:
            holder[0] = None  # autograd keeps what the backward needs; do not pin an O(L^2) tensor between calls

    return fn


def all_providers() -> Dict[str, Provider]:
    """Core providers plus Liger and Flex, in the order a sweep runs them."""
    p = core_providers()
    ordered = {k: p[k] for k in p if k.startswith("ours-")}
    for k in p:
        if k.startswith("sdpa-"):
            ordered[k] = p[k]
    for b in ("flash", "cudnn", "efficient", "math"):
        ordered[f"rotate+sdpa-{b}"] = p[f"rotate+sdpa-{b}"]
        ordered[f"liger+sdpa-{b}"] = Provider(f"liger+sdpa-{b}", liger_sdpa(b), ("rope", "hope"),
                                             f"Liger-Kernel Triton RoPE then SDPA[{b}]")
    ordered["flex"] = Provider("flex", flex, ("none", "alibi", "tapa"), "FlexAttention (compiled), score_mod")
    for k in p:
        ordered.setdefault(k, p[k])
    return ordered
