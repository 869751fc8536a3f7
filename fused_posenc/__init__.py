"""fused_posenc: exact attention with positional encodings fused into FlashAttention-style kernels.

    from fused_posenc import fused_attention
    out = fused_attention(q, k, v, encoding="fope", causal=True)
"""
from .attention import fused_attention, merge_attention_partials, reference_attention
from .kvcache import fused_attention_with_kvcache
from .varlen import cu_seqlens_from_position_ids, fused_attention_varlen
from .encodings import ALiBi, Encoding, FoPE, HoPE, NoPE, RoPE, TAPA, get_encoding
from .rotary import apply_rotary

__version__ = "0.1.0"

__all__ = ["fused_attention", "fused_attention_varlen", "fused_attention_with_kvcache", "cu_seqlens_from_position_ids",
           "reference_attention", "merge_attention_partials", "apply_rotary", "NoPE", "RoPE", "HoPE", "FoPE", "ALiBi",
           "TAPA", "get_encoding", "Encoding", "__version__"]
