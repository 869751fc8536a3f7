"""Hugging Face transformers models on the fused kernels, by one call.

    from fused_posenc.integrations.transformers import apply_fused_posenc
    apply_fused_posenc(model)                  # the model's own RoPE, now rotated inside the attention kernel
    apply_fused_posenc(model, encoding="fope") # converted to FoPE (learnable coefficients per layer) to fine-tune

Families: Llama, Mistral, Qwen2, Qwen3, Gemma-2 (any attention module with ``q_proj``/``k_proj``/``v_proj``/
``o_proj``, ``head_dim`` and ``layer_idx``; Qwen3's ``q_norm``/``k_norm`` are applied as the stock model does).
Sliding windows (Mistral's ``config.sliding_window``, Qwen2's and Gemma-2's sliding layers) run as the kernels'
``window_size=(sliding_window - 1, -1)`` (HF: key ``j`` visible to query ``i`` iff ``i - j < sliding_window``, here
on positions); Gemma-2's ``attn_logit_softcapping`` as ``softcap``, its ``query_pre_attn_scalar`` through the
module's ``scaling``.

How it works. Each attention module's ``forward`` is replaced: the projections as in the stock module, then
:func:`fused_posenc.fused_attention` with ``q_positions`` / ``k_positions`` from the model's ``position_ids``, so
HF's separate rotation (``apply_rotary_pos_emb``) is not run at all. ``encoding=None`` reads the model's own
RoPE from its rotary module: ``rotary_emb.inv_freq`` and ``attention_scaling``, which HF derives from the config
for every rope type (default, linear, yarn with mscale/mscale_all_dim/truncate/attention_factor, llama3,
``partial_rotary_factor``), become ``RoPE(inv_freq=..., attention_factor=...)``. The angles are then exact
(``pos * inv_freq`` reduced exactly) where HF rounds ``float32(pos) * inv_freq``: equal to HF's to float32
accuracy at short positions, more accurate at long ones. ``dynamic`` (NTK) and ``longrope`` change their
frequencies with the sequence length at run time: HF's rotary module still runs once per model call and updates its
``inv_freq`` / ``attention_scaling``; the layers read them (one host read per model call, where HF's dynamic update
makes its own) and rebuild the RoPE when they changed (:class:`_RuntimeRoPE`). Such models do not compile with
``fullgraph=True`` (that read, like HF's own update, is data-dependent control flow). With a KV cache the kernel
rotates every cached key with the call's frequencies, which is what a forward of the whole sequence computes;
stock HF caches rotated keys, so once a ``generate`` crosses the length where the frequencies change, its old keys
keep their old rotation and the two can differ from there on (before it they are equal).

KV cache (``generate``). The cache holds the keys *unrotated* (the kernel rotates them by their positions); each
layer keeps the positions of its cached keys beside them (on the cache object), so a call sees every key at the
position it was given (a sliding-window cache that drops old keys keeps the positions of the ones it keeps).

Padding. A pre-forward hook on the model reads the 2-D ``attention_mask`` it is called with (one device read, as
HF's own mask code makes): when there is none, or it is all ones, the attention layers ignore the 4-D causal or
sliding-window mask HF builds (the kernels apply the same rule from the positions). Left padding (each row's ones
after its zeros: batched ``generate``) and right padding (ones before zeros: padded training batches) run on the
kernels too, as ``k_lengths`` with ``padding_side`` (``_layer_key_lengths``): the real tokens' outputs are the stock
model's; a padding token's own output is not (HF's is arbitrary too: give its label -100). Any other mask (zeros
between ones, a caller's 4-D mask) takes the documented fallback: q and the keys rotated by
:func:`fused_posenc.apply_rotary` (exact angles), then PyTorch's SDPA with HF's mask (soft-capping layers: the same in
plain PyTorch, capped); the cache stays unrotated either way. ALiBi and TAPA have no masked fallback (an error
says so), only the padding path.
"""
from __future__ import annotations

import math
import types
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..attention import fused_attention
from ..encodings import Encoding, FoPE, RoPE, get_encoding
from ..rotary import apply_rotary

_RUNTIME_ROPE_TYPES = ("dynamic", "longrope")  # frequencies chosen by the sequence length at run time


def _rope_type(config) -> str:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(rp.get("rope_type", rp.get("type", "default")))


def rope_from_hf(config, rotary_emb: Optional[torch.nn.Module] = None) -> RoPE:
    """The :class:`RoPE` of an HF config (the one place that reads one).

    ``rotary_emb``: the model's rotary module (``model.model.rotary_emb``); its ``inv_freq`` and
    ``attention_scaling`` are what the model computes with. Without it they are derived from the config by HF's
    own rope functions (``transformers.modeling_rope_utils``)."""
    kind = _rope_type(config)
    if rotary_emb is not None:
        inv_freq, att = rotary_emb.original_inv_freq if hasattr(rotary_emb, "original_inv_freq") \
            else rotary_emb.inv_freq, float(rotary_emb.attention_scaling)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if kind == "default":
            rp = getattr(config, "rope_parameters", None) or {}
            base = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            att = 1.0
        else:  # dynamic / longrope: their frequencies at short lengths (the model's start state)
            inv_freq, att = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    return RoPE(inv_freq=inv_freq, attention_factor=float(att))


class _RuntimeRoPE:
    """The RoPE of a ``dynamic`` / ``longrope`` model: whatever its rotary module's ``inv_freq`` and
    ``attention_scaling`` are in the current call (HF updates them by the sequence length when the model's forward
    calls the rotary module, before the layers). A forward hook marks them stale on each rotary call; the first layer
    that needs them reads them (one host read) and the rest reuse that; a RoPE is built once per distinct value."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary
        self.fresh = None  # the RoPE of the current call, None when stale
        self.built = {}    # (inv_freq, attention_scaling) -> RoPE, the last few
        rotary.register_forward_hook(self._stale)

    def _stale(self, module, args, output):
        self.fresh = None

    def current(self) -> RoPE:
        if self.fresh is None:
            inv = self.rotary.inv_freq.detach().to("cpu", torch.float32)
            key = (tuple(inv.tolist()), float(self.rotary.attention_scaling))
            if key not in self.built:
                if len(self.built) >= 8:
                    self.built.pop(next(iter(self.built)))
                self.built[key] = RoPE(inv_freq=inv, attention_factor=key[1])
            self.fresh = self.built[key]
        return self.fresh


def _attention_modules(model):
    for module in model.modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx")):
            yield module


def _rotary_module(model):
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module
    return None


def apply_fused_posenc(model: torch.nn.Module, encoding: Union[None, str, Encoding] = None, backend: str = "auto",
                       **encoding_options) -> torch.nn.Module:
    """Make ``model``'s attention layers run on the fused kernels (in place; returns ``model``).

    encoding: ``None`` keeps the model's own RoPE (read from its config, see :func:`rope_from_hf`); a name
        (``"fope" | "hope" | "tapa" | "alibi" | "none" | "rope"``) or an :class:`Encoding` converts the model to
        that encoding for continued training. FoPE by name gets one learnable FoPE per layer (its coefficients are
        parameters of the layer: in ``model.parameters()`` and the state dict), sized by the model's head dim,
        heads and ``max_position_embeddings``; ``encoding_options`` go to the encoding's constructor.
    backend: as in :func:`fused_posenc.fused_attention`.
    """
    config = model.config
    layers = list(_attention_modules(model))
    if not layers:
        raise ValueError(f"no attention module with q_proj/k_proj/v_proj/o_proj found in {type(model).__name__}")
    shared = None
    if encoding is None:
        if encoding_options:
            raise ValueError(f"encoding options {sorted(encoding_options)} given without an encoding")
        rotary = _rotary_module(model)
        if _rope_type(config) in _RUNTIME_ROPE_TYPES:
            if rotary is None:
                raise ValueError(f"rope type {_rope_type(config)!r} changes its frequencies in the model's rotary "
                                 "module at run time, and this model has none (no module with inv_freq)")
            shared = _RuntimeRoPE(rotary)
        else:
            shared = rope_from_hf(config, rotary)
    elif isinstance(encoding, Encoding):
        shared = encoding
    state = _padding_state(model)
    for attn in layers:
        attn.__dict__["_fused_posenc_state"] = state
        if shared is not None:
            enc = shared
        elif str(encoding).lower() == "fope":
            opts = dict(num_heads=config.num_attention_heads, learnable=True,
                        train_len=getattr(config, "max_position_embeddings", 4096))
            opts.update(encoding_options)
            p = next(attn.parameters())
            enc = FoPE(head_dim=attn.head_dim, **opts).to(device=p.device)
        else:
            enc = get_encoding(encoding, **encoding_options)
        if isinstance(enc, torch.nn.Module):
            attn.fused_posenc_encoding = enc  # a submodule: its parameters train and save with the layer
        else:
            attn.__dict__["fused_posenc_encoding"] = enc
        attn.fused_posenc_backend = backend
        if not hasattr(attn, "_fused_posenc_stock_forward"):
            attn._fused_posenc_stock_forward = attn.forward
        attn.forward = types.MethodType(_fused_forward, attn)
    return model


def _padding_state(model) -> dict:
    """The padding of the model's current call, kept up to date by a forward pre-hook (registered once) from the 2-D
    ``attention_mask`` it is called with: ``{"padded": bool, "k_lengths": (B,) int64 or None, "side": "left" |
    "right" | None, "mask_len": int}``. A mask whose rows are ones after zeros (left padding, as batched
    ``generate`` makes it) or ones before zeros (right padding) becomes key lengths for the kernels; any other mask
    (holes, a caller's own 4-D mask) leaves ``k_lengths`` None and the layers take the masked fallback."""
    state = model.__dict__.get("_fused_posenc_state")
    if state is not None:
        return state
    state = model.__dict__["_fused_posenc_state"] = {"padded": None, "k_lengths": None, "side": None, "mask_len": 0}

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state.update(padded=True, k_lengths=None, side=None, mask_len=0)
        if mask is None:
            state["padded"] = False
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            m = mask.to(torch.int32)
            ones_after_zeros = (m.cummax(1).values == m).all()
            ones_before_zeros = (m.flip(1).cummax(1).values == m.flip(1)).all()
            # one device read, as HF's own mask code makes
            every, left, right = torch.stack([(m != 0).all(), ones_after_zeros, ones_before_zeros]).tolist()
            state["padded"] = not every
            if not every and (left or right):
                state.update(k_lengths=m.sum(1), side="left" if left else "right", mask_len=m.shape[1])
        # else: a caller's own 4-D mask, honoured by the masked fallback

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return state


def _layer_key_lengths(state: dict, lk: int):
    """``(k_lengths, side)`` of this layer's ``lk`` keys from the call's padding, or ``None`` (no usable lengths:
    the masked fallback). The mask's columns are the cache's keys; a sliding-window cache that keeps only its last
    ``lk`` keys drops the first ``mask_len - lk`` columns."""
    lengths, side, mask_len = state.get("k_lengths"), state.get("side"), state.get("mask_len", 0)
    if lengths is None or mask_len < lk:
        return None
    if side == "left":
        return lengths.clamp(max=lk), side
    return (lengths - (mask_len - lk)).clamp(min=0), side


def _layer_window(self) -> Optional[int]:
    """The layer's sliding window (HF's ``sliding_window``: keys with ``i - j < window``), or ``None``."""
    if hasattr(self, "sliding_window"):  # Qwen2, Gemma-2: per layer (None on full-attention layers)
        return self.sliding_window
    return getattr(getattr(self, "config", None), "sliding_window", None)  # Mistral: every layer


def _key_positions(self, cache, q_pos, b):
    """The positions of every key this call sees (cached ones first), ``(Bp, Lk)``; records them on the cache."""
    if cache is None:
        return q_pos
    store = cache.__dict__.setdefault("_fused_posenc_positions", {})
    prev = store.get(self.layer_idx)
    if prev is not None and prev.shape[0] != q_pos.shape[0]:
        prev, q_pos = prev.expand(b, -1), q_pos.expand(b, -1)
    k_pos = q_pos if prev is None else torch.cat([prev, q_pos], dim=1)
    store[self.layer_idx] = k_pos
    return k_pos


def _trim_positions(self, cache, k_pos, lk):
    """A sliding-window cache keeps only its last ``lk`` keys: their positions are the last ``lk``."""
    if k_pos.shape[1] > lk:
        k_pos = k_pos[:, -lk:]
        if cache is not None:
            cache.__dict__["_fused_posenc_positions"][self.layer_idx] = k_pos
    return k_pos


def _fused_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                   past_key_values=None, past_key_value=None, **kwargs):
    cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
    enc = self.fused_posenc_encoding
    if isinstance(enc, _RuntimeRoPE):
        enc = enc.current()
    b, t, _ = hidden_states.shape
    shape = (b, t, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over the head dim before the rotation
        q, k = self.q_norm(q), self.k_norm(k)
    q_pos = kwargs.get("position_ids")
    if q_pos is None:
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        q_pos = torch.arange(past, past + t, device=q.device)[None]
    q_pos = q_pos.to(torch.int64)
    if cache is not None:  # unrotated keys; (B, H, L, D) is the cache's layout
        k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
    k_pos = _trim_positions(self, cache, _key_positions(self, cache, q_pos, b), k.shape[1])
    window = _layer_window(self)
    softcap = getattr(self, "attn_logit_softcapping", None)
    scale = getattr(self, "scaling", None)
    state = self.__dict__.get("_fused_posenc_state", {})
    padded = state.get("padded")
    kw = dict(causal=True, softmax_scale=scale, q_positions=q_pos, k_positions=k_pos,
              backend=self.fused_posenc_backend, window_size=(-1, -1) if window is None else (window - 1, -1),
              softcap=softcap)
    if attention_mask is None or padded is False:  # HF's mask is only the causal / sliding rule: the kernels' own
        out = fused_attention(q, k, v, enc, **kw)
    elif (lengths := _layer_key_lengths(state, k.shape[1])) is not None:  # left or right padding: key lengths
        out = fused_attention(q, k, v, enc, k_lengths=lengths[0], padding_side=lengths[1], **kw)
    else:
        out = _masked_fallback(self, q, k, v, enc, q_pos, k_pos, attention_mask, scale, softcap)
    out = self.o_proj(out.reshape(b, t, -1).contiguous())
    return out, None


def _masked_fallback(self, q, k, v, enc, q_pos, k_pos, mask, scale, softcap=None):
    """With an attention mask: rotate by apply_rotary (exact angles) and run SDPA with the mask (soft-capped
    scores: the same computation in plain PyTorch, as HF's eager attention does it)."""
    if enc.name not in ("rope", "hope", "fope", "none"):
        raise NotImplementedError(f"an attention mask (padding) with encoding {enc.name!r}: no fallback yet; "
                                  "use unpadded batches")
    h, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    if enc.is_rotation:
        q = apply_rotary(q, enc, q_pos.expand(q.shape[0], -1))
        k = apply_rotary(k, enc, k_pos.expand(k.shape[0], -1))
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    mask = mask[..., : k.shape[1]]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    s = softcap * torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap)
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return (torch.softmax(s.float(), -1).to(v.dtype) @ v).transpose(1, 2)
