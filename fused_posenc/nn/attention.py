"""``PositionalAttention``: a multi-head attention layer (q/k/v/o projections, GQA) whose positional encoding is
computed inside the fused kernel, with the encoding as a submodule (FoPE's coefficients live in the layer's
``state_dict``, learnable or frozen)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..attention import fused_attention
from ..encodings import Encoding, FoPE, get_encoding


def build_encoding(encoding: Union[str, Encoding], head_dim: int, num_heads: int, fope_learnable: bool = False,
                   fope_train_len: int = 4096, seed: Optional[int] = None) -> Encoding:
    """An encoding for a layer with ``num_heads`` query heads of ``head_dim``: a name builds a fresh instance
    (``"fope"``: a :class:`FoPE` with one coefficient slice per query head, learnable if ``fope_learnable``, its
    initialisation drawn from the global RNG unless ``seed`` is given, like any layer's weights); an instance is
    used as it is."""
    if isinstance(encoding, Encoding):
        return encoding
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a name or an Encoding instance, got {type(encoding).__name__}")
    if encoding.lower() == "fope":
        return FoPE(head_dim=head_dim, num_heads=num_heads, train_len=fope_train_len, learnable=fope_learnable,
                    seed=seed)
    return get_encoding(encoding)


class PositionalAttention(nn.Module):
    """Multi-head (GQA) self-attention with a fused positional encoding.

    Args:
        d_model: model width ``C``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (``H % Hkv == 0``); default ``H``.
        head_dim: ``D``; default ``C // H``.
        encoding: a name (``"none" | "rope" | "hope" | "fope" | "alibi" | "tapa"``) or an :class:`Encoding`.
            An ``nn.Module`` encoding (FoPE) becomes the submodule ``self.encoding``.
        causal: causal self-attention (key ``n`` visible to query ``m`` iff ``pos[n] <= pos[m]``).
        bias: biases on the four projections.
        fope_learnable, fope_train_len: for ``encoding="fope"`` by name.
        backend: passed to :func:`fused_posenc.fused_attention`.

    ``forward(x, positions=None)``: ``x (B, T, C)``; ``positions``: integer ``(T,)`` or ``(B, T)``, default
    ``arange(T)``. Returns ``(B, T, C)``.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, encoding: Union[str, Encoding] = "rope", causal: bool = True,
                 bias: bool = False, fope_learnable: bool = False, fope_train_len: int = 4096,
                 backend: str = "auto"):
        super().__init__()
        for name, val in (("d_model", d_model), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}, got {num_kv_heads!r}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}: pass head_dim")
            head_dim = d_model // num_heads
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.causal, self.backend = bool(causal), backend
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)
        self.encoding = build_encoding(encoding, head_dim, num_heads, fope_learnable, fope_train_len)
        self.encoding.validate(head_dim, num_heads, num_kv_heads, 1)

    def project(self, x: torch.Tensor):
        """``(q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, D))`` of ``x (B, T, C)``."""
        b, t, _ = x.shape
        return (self.q_proj(x).view(b, t, self.num_heads, self.head_dim),
                self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim),
                self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, seqlen, {self.d_model}), got shape {tuple(x.shape)}")
        q, k, v = self.project(x)
        out = fused_attention(q, k, v, self.encoding, causal=self.causal, q_positions=positions,
                              k_positions=positions, backend=self.backend)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, backend={self.backend!r}, "
                f"encoding={self.encoding if not isinstance(self.encoding, nn.Module) else type(self.encoding).__name__}")
