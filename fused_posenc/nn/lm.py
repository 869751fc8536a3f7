"""A tiny decoder-only language model built from :class:`PositionalAttention`: token embedding, pre-norm blocks
(RMSNorm, attention, RMSNorm, SiLU-gated MLP), a final norm and a head tied to the embedding."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..encodings import Encoding
from .attention import PositionalAttention


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, in float32 (cast back to x's dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``; the MLP is SiLU-gated with ``mlp_ratio * C`` hidden units."""

    def __init__(self, d_model: int, attn: PositionalAttention, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.attn_norm, self.attn = RMSNorm(d_model), attn
        self.mlp_norm = RMSNorm(d_model)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    """Decoder-only LM.

    Args:
        vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim: the usual sizes.
        encoding: a name or an :class:`Encoding` per model; a name builds one encoding per layer (``"fope"``: one
            :class:`~fused_posenc.FoPE` module per layer, learnable if ``fope_learnable``); an instance is shared.
        mlp_ratio: MLP width over ``d_model``.
        backend: passed to the attention layers.

    ``forward(tokens, positions=None)``: ``tokens (B, T)`` int64, ``positions`` ``(T,)`` or ``(B, T)``; returns
    logits ``(B, T, vocab_size)``. ``loss(tokens)``: next-token cross-entropy of ``tokens[:, 1:]``.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 encoding: Union[str, Encoding] = "rope", mlp_ratio: float = 4.0, fope_learnable: bool = False,
                 fope_train_len: int = 4096, backend: str = "auto"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([
            Block(d_model, PositionalAttention(d_model, num_heads, num_kv_heads, head_dim, encoding, causal=True,
                                               fope_learnable=fope_learnable, fope_train_len=fope_train_len,
                                               backend=backend), mlp_ratio)
            for _ in range(num_layers)])
        self.norm = RMSNorm(d_model)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions)
        return self.norm(x) @ self.embed.weight.t()  # tied head

    def loss(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self(tokens[:, :-1], None if positions is None else positions[..., :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
