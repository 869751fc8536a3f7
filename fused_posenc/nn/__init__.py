"""Modules for models: an attention layer with a fused positional encoding and a tiny LM built from it."""
from .attention import PositionalAttention, build_encoding
from .lm import Block, RMSNorm, TinyLM

__all__ = ["PositionalAttention", "TinyLM", "Block", "RMSNorm", "build_encoding"]
