"""Context parallelism: attention over a sequence sharded across ranks of a ``torch.distributed`` group.

    from fused_posenc.distributed import ring_attention, shard
    q_local = shard(q, rank, world, "zigzag")          # this rank's rows of (batch, seqlen, heads, headdim)
    out_local = ring_attention(q_local, k_local, v_local, "fope", causal=True, layout="zigzag")

Works with ``gloo`` (CPU tensors) and ``nccl`` (CUDA tensors) alike: only point-to-point sends and receives.
"""
from .layout import LAYOUTS, shard, shard_rows, unshard
from .ring import ring_attention

__all__ = ["ring_attention", "shard", "shard_rows", "unshard", "LAYOUTS"]
