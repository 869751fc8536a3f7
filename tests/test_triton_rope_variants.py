"""Triton backend with every RoPE option, and its rotation tables."""
import pytest
import torch

import fused_posenc as fp
from helpers import make_qkv
from triton_cases import DEVICE, check_triton, needs_triton

pytestmark = needs_triton

VARIANTS = {
    "interleaved": fp.RoPE(interleaved=True),
    "partial": fp.RoPE(rotary_dim=16),
    "partial_interleaved": fp.RoPE(rotary_dim=24, interleaved=True),
    "linear": fp.RoPE(scaling={"type": "linear", "factor": 4.0}),
    "ntk": fp.RoPE(scaling={"type": "ntk", "factor": 4.0}),
    "yarn": fp.RoPE(rotary_dim=32, scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}),
    "llama3": fp.RoPE(base=5e5, scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rope_variant(name, causal):
    q, k, v = make_qkv(2, 33, 47, 4, 2, 48, torch.float16, DEVICE, seed=21)
    check_triton(q, k, v, VARIANTS[name], causal)


def test_rope_tables_of_default_positions_are_built_once_per_length(monkeypatch):
    """RoPE/HoPE run on per-row cos/sin tables: built per call for caller-given positions, once per length (kept
    on the plan) for default ones, and the cached tables give the same output."""
    from fused_posenc.ops.triton import autograd

    built = []
    real = autograd.rope_tables
    monkeypatch.setattr(autograd, "rope_tables", lambda plan, pos: built.append(pos.shape) or real(plan, pos))
    enc = fp.RoPE()
    q, k, v = make_qkv(1, 24, 40, 2, 1, 32, torch.float32, DEVICE, seed=23)
    first = fp.fused_attention(q, k, v, enc, causal=True, backend="triton")
    assert built == [(1, 24), (1, 40)]  # the query rows (positions 16..39) and the key rows
    again = fp.fused_attention(q, k, v, enc, causal=True, backend="triton")
    assert len(built) == 2 and torch.equal(first, again)
    pos = torch.arange(40, device=DEVICE)
    fp.fused_attention(q, k, v, enc, causal=True, backend="triton", q_positions=pos[16:], k_positions=pos)
    assert built[2:] == [(1, 24), (1, 40)]
